"""Diffusers pipeline classes with an `acceleration=` argument (see `pipelines.accelerated`)."""

from .accelerated import (
    AcceleratedCogVideoXPipeline,
    AcceleratedDiTPipeline,
    AcceleratedFluxPipeline,
    AcceleratedHunyuanVideoPipeline,
    AcceleratedPixArtAlphaPipeline,
    AcceleratedPixArtSigmaPipeline,
    AcceleratedStableDiffusion3Pipeline,
    AcceleratedWanPipeline,
    AccelerationMixin,
    accelerated_class,
)

__all__ = [
    "AcceleratedCogVideoXPipeline",
    "AcceleratedDiTPipeline",
    "AcceleratedFluxPipeline",
    "AcceleratedHunyuanVideoPipeline",
    "AcceleratedPixArtAlphaPipeline",
    "AcceleratedPixArtSigmaPipeline",
    "AcceleratedStableDiffusion3Pipeline",
    "AcceleratedWanPipeline",
    "AccelerationMixin",
    "accelerated_class",
]
