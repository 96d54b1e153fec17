"""reprobox: container images in which PyTorch training is bit-for-bit reproducible."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
