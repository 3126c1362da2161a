"""PSA-MF: `personality` (the Big Five encoder), `train` (the model's training and saved form), `tune` (the Optuna search over τ, N and λ)."""
