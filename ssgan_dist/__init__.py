"""ssgan-dist: distributed training of SSGAN (sketch -> semantic sketch -> photo)."""

__version__ = "0.1.0"
