"""The published numbers psamf compares with (DESIGN.md, "Numbers to compare with"), with the
metric convention each is read in. Acc2/F1 are in %, as the papers print them."""
from __future__ import annotations

# PSA-MF, CMU-MOSI. The paper does not state its Acc2/F1 convention; MMSA-style papers report
# Non0, so they sit in the Non0 columns.
PSAMF_MOSI = {"mae": 0.686, "corr": 0.807, "non0_acc2": 86.43, "non0_f1": 86.19}

# Personalized MulT, CMU-MOSI, mean over its 10 LOO users (Tables 1-3). Built on the MulT repo,
# whose binary accuracy is the Non0 subset (psamf.metrics: mult_acc2 == non0_acc2); F1 is the
# repo's argument-swapped weighted F1 (mult_f1). Its Acc2/F1 are printed as fractions.
PERSONALIZED_MULT_MOSI = {
    "baseline": {"mae": 0.94, "corr": 0.68, "acc7": 36.0, "mult_f1": 79.0, "non0_acc2": 81.0},
    "fs_ua": {"mae": 0.97, "corr": 0.68, "acc7": 32.0, "mult_f1": 81.0, "non0_acc2": 79.0},
    "fs_ua_kd": {"mae": 0.89, "corr": 0.69, "acc7": 35.0, "mult_f1": 85.0, "non0_acc2": 85.0},
}

# MMSA's means of 5 seeds on MOSI: reference points for what MulT-class models reach.
MMSA_MOSI = {"MulT (MMSA, 5 seeds)": {"mae": 0.880, "has0_acc2": 79.71, "non0_acc2": 80.98},
             "Self-MM (MMSA, 5 seeds)": {"mae": 0.708, "has0_acc2": 83.44, "non0_acc2": 85.46}}
