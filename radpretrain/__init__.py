"""radpretrain: your own foundation encoder from your own radiograph archive."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_encoder(path: Any) -> Any:
    """Load an exported encoder folder (encoder.safetensors + encoder.json) as a timm module."""
    from radpretrain.models.encoders import load_encoder as _load

    return _load(path)
