"""Lynx Farm: Parquet manifests of (portrait, prompt) rows -> personalized videos + identity scores."""

__version__ = "0.1.0"
