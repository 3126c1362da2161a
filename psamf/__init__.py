"""psamf: personalized multimodal sentiment analysis (Personalized MulT and PSA-MF)."""

__version__ = "0.1.0"
