"""Offline test fixtures: tiny random-weight pipelines of the real diffusers classes."""

from .tiny import FAMILIES, VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline

__all__ = ["FAMILIES", "VIDEO_FAMILIES", "tiny_call_kwargs", "tiny_pipeline"]
