"""Personalized MulT: pretrain (many speakers), finetune (one user, k-shot, UA + KD), loo (the experiment)."""
