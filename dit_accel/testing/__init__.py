"""Offline test fixtures: tiny random-weight pipelines of the real diffusers classes, random-weight
transformers of real releases, and a counter of dispatched ops and host syncs (`testing.dispatch`)."""

from .tiny import (FAMILIES, MEDIUM_FAMILIES, RELEASES, VARIANTS, VIDEO_FAMILIES, medium_call_kwargs, medium_pipeline,
                   release_call_kwargs, release_pipeline, release_transformer, tiny_call_kwargs, tiny_pipeline,
                   wan_inputs)

__all__ = ["FAMILIES", "MEDIUM_FAMILIES", "RELEASES", "VARIANTS", "VIDEO_FAMILIES", "medium_call_kwargs",
           "medium_pipeline", "release_call_kwargs", "release_pipeline", "release_transformer", "tiny_call_kwargs",
           "tiny_pipeline", "wan_inputs"]
