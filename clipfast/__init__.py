"""clipfast: find and remove backdoors in CLIP models, fast (EftCLIP)."""

__version__ = "0.1.0"
