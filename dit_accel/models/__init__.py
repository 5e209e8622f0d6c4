"""One adapter per transformer family; importing this package registers them all."""

from . import cogvideox, dit, flux, hunyuan_video, pixart, sd3, wan  # noqa: F401  (registration)
from .base import ModelAdapter, TokenGrid
from .registry import UnsupportedModelError, adapter_for, pipeline_transformers, supported_families

__all__ = ["ModelAdapter", "TokenGrid", "UnsupportedModelError", "adapter_for", "pipeline_transformers", "supported_families"]
