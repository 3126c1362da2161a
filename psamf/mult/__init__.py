"""Personalized MulT: pretrain (many speakers), finetune (one user, k-shot, UA + KD), loo (the experiment)."""

# The LOO tables' rows: the pretrained model as is, fine-tuned with the User Adapter, and with KD too.
# Here rather than in finetune.py, so that the report tasks read them without importing torch.
VARIANTS = ("baseline", "fs_ua", "fs_ua_kd")
