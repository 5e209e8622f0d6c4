"""Shared test helpers: run a tiny pipeline deterministically, snapshot a model, probe techniques."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from dataclasses import dataclass

import torch

from dit_accel.attention.intercept import dense_attention
from dit_accel.config import AccelerationConfig, Stage
from dit_accel.runtime.registry import register_technique
from dit_accel.runtime.technique import Technique
from dit_accel.testing import tiny_call_kwargs
from dit_accel.pipelines import (
    AcceleratedCogVideoXPipeline,
    AcceleratedDiTPipeline,
    AcceleratedFluxPipeline,
    AcceleratedHunyuanVideoPipeline,
    AcceleratedPixArtAlphaPipeline,
    AcceleratedPixArtSigmaPipeline,
    AcceleratedStableDiffusion3Pipeline,
    AcceleratedWanPipeline,
)


#: the Accelerated class of each tiny family's pipeline
ACCELERATED = {
    "sd3": AcceleratedStableDiffusion3Pipeline,
    "flux": AcceleratedFluxPipeline,
    "pixart": AcceleratedPixArtAlphaPipeline,
    "pixart_sigma": AcceleratedPixArtSigmaPipeline,
    "dit": AcceleratedDiTPipeline,
    "wan": AcceleratedWanPipeline,
    "hunyuan_video": AcceleratedHunyuanVideoPipeline,
    "cogvideox": AcceleratedCogVideoXPipeline,
}


def run(pipe, family: str, **overrides) -> torch.Tensor:
    """One call of `pipe` with the family's default tiny arguments; the output as a tensor."""
    out = pipe(**tiny_call_kwargs(family, **overrides))
    images = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(images).float()


@contextlib.contextmanager
def served(app):
    """A Gradio app (`dit_accel.ui.build_app`) served on a free 127.0.0.1 port until the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app
    finally:
        app.close()


def model_state(module: torch.nn.Module) -> dict:
    """Everything apply() may touch: module identities, instance forwards, hook registries, processors."""
    state = {
        "modules": {name: id(m) for name, m in module.named_modules()},
        "forwards": sorted(name for name, m in module.named_modules() if "forward" in m.__dict__),
        "registries": sorted(name for name, m in module.named_modules() if hasattr(m, "_diffusers_hook")),
        "hooks": sorted((name, tuple(m._diffusers_hook._hook_order)) for name, m in module.named_modules()
                        if hasattr(m, "_diffusers_hook")),
    }
    if hasattr(module, "attn_processors"):
        state["processors"] = {name: id(p) for name, p in module.attn_processors.items()}
    return state


@dataclass(frozen=True)
class RecordingConfig(AccelerationConfig):
    """A no-op technique that lets tests read the step context of every call (occupies no stage)."""

    seen: list = dataclasses.field(default_factory=list)
    name = "record"

    def stages(self):
        return frozenset()

    @classmethod
    def keep_all(cls):
        return cls()


@register_technique(RecordingConfig, "test probe: records the step context", plan_member=False)
class RecordingTechnique(Technique):
    def begin_call(self, call_state):
        self.config.seen.append(call_state.ctx)


@dataclass(frozen=True)
class AttentionRecorderConfig(RecordingConfig):
    """A stage-6 kernel that records the q/k lengths of every self-attention and runs dense SDPA."""

    name = "attention-recorder"

    def stages(self):
        return frozenset({Stage.ATTENTION_KERNEL})


@register_technique(AttentionRecorderConfig, "test probe: records attention shapes")
class AttentionRecorderTechnique(Technique):
    def attend(self, call_state, call, query, key, value, bias, **kwargs):
        image = call.image_slice(query.shape[2])
        self.config.seen.append({"step": call_state.ctx.step_index, "branch": call_state.ctx.branch, "block": call.block_index,
                                 "queries": query.shape[2], "keys": key.shape[2],
                                 "image_queries": image.stop - image.start, "batch": query.shape[0]})
        return dense_attention(query, key, value, bias, **kwargs), query.shape[2] * key.shape[2]


def add_tiny_flux_ip_adapter(pipe, image_embed_dim: int = 32, seed: int = 0) -> dict:
    """Load a random-weight IP-Adapter (4 image tokens) into a tiny Flux pipeline's transformer through
    diffusers' own loader, with no download; returns the call arguments that pass an image embedding
    (and a zero negative one, since the pipeline has no image encoder to make it)."""
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(seed)
    cross, inner, tokens = transformer.config.joint_attention_dim, transformer.inner_dim, 4

    def weights(*shape):
        return 0.1 * torch.randn(*shape, generator=generator)

    image_proj = {"proj.weight": weights(tokens * cross, image_embed_dim), "proj.bias": weights(tokens * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter = {f"{block}.{name}.{kind}": weights(inner, cross) if kind == "weight" else weights(inner)
                  for block in range(len(transformer.transformer_blocks)) for name in ("to_k_ip", "to_v_ip")
                  for kind in ("weight", "bias")}
    transformer._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": ip_adapter}, low_cpu_mem_usage=False)
    embeds = torch.randn(1, 1, image_embed_dim, generator=generator)
    return {"ip_adapter_image_embeds": [embeds], "negative_ip_adapter_image_embeds": [torch.zeros_like(embeds)]}
