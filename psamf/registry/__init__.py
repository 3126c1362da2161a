"""The MLflow model registry: `serving` (both models as pyfunc), `evaluation` (mlflow.models.evaluate), `gate` (champion/challenger)."""
