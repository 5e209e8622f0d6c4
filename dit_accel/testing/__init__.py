"""Offline test fixtures: tiny random-weight pipelines of the real diffusers classes."""

from .tiny import (FAMILIES, MEDIUM_FAMILIES, VARIANTS, VIDEO_FAMILIES, medium_call_kwargs, medium_pipeline,
                   tiny_call_kwargs, tiny_pipeline)

__all__ = ["FAMILIES", "MEDIUM_FAMILIES", "VARIANTS", "VIDEO_FAMILIES", "medium_call_kwargs", "medium_pipeline",
           "tiny_call_kwargs", "tiny_pipeline"]
