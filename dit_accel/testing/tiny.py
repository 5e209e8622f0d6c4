"""Tiny, offline, random-weight pipelines built from the real diffusers classes.

Acceleration code must be tested against the genuine pipeline and transformer
classes (their forward signatures, attention processors and denoising loops),
but the real checkpoints are gigabytes and need the Hub. ``tiny_pipeline``
assembles every component from its config class with seeded random weights
(transformers of 0.15-0.4 M parameters), and ``tiny_call_kwargs`` gives call
arguments that run one generation in well under a second on a CPU.

Default sizes: image families make 128x128 images through a VAE with
downsampling 4 and patch 2 (16x16 = 256 image tokens; DiT is fixed to that size
by its ``sample_size``). Video families make 9 frames of 128x128 through a VAE
with 8x spatial and 4x temporal compression and patch 2 (3 x 8x8 = 192 tokens).
Video calls spend most of their time in the VAE decode; pass
``output_type="latent"`` when timing the transformer through the pipeline.

``medium_pipeline`` / ``medium_call_kwargs`` (SD3, Wan, PixArt) are the same pipelines with a
random-weight transformer of 4 blocks of 6 heads of 64 at 4,096 image/video tokens: big enough on a
CPU for wall clock to follow FLOPs (the size of the official RAS CPU comparison), still offline.

``release_transformer`` builds a random-weight transformer with a real release's config (``RELEASES``:
Wan 2.1 1.3B and 14B, SD3.5 medium), so kernels see the shapes users run; ``release_pipeline`` puts it in
its pipeline without text encoders or VAE (``release_call_kwargs`` passes random prompt embeddings of
the release's text widths and lengths; output latents), and ``wan_inputs`` are the inputs of one direct
Wan transformer call. Overrides cut blocks or heads where a machine cannot hold the real ones.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from . import tokenizers as tok

FAMILIES = ("sd3", "flux", "pixart", "pixart_sigma", "dit", "wan", "hunyuan_video", "cogvideox")
VIDEO_FAMILIES = ("wan", "hunyuan_video", "cogvideox")

# Text-encoder widths; the transformer configs below are wired to these.
CLIP_HIDDEN = 32
CLIP_PROJECTION = 32
T5_D_MODEL = 64
LLAMA_HIDDEN = 64

IMAGE_PROMPT = "a red circle on the left of a blue square"
VIDEO_PROMPT = "a red circle moving from left to right"
# DiT is class-conditional; the pipeline maps these names via `pipe.get_label_ids`.
# Any id in 0..999 is valid (the embedding table is ImageNet-sized; 1000 is the CFG null class).
DIT_ID2LABEL = {
    i: f"{color} {shape}"
    for i, (color, shape) in enumerate(
        (c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")
    )
}


def _inner_dim(cfg: dict) -> int:
    return cfg["num_attention_heads"] * cfg["attention_head_dim"]


def _rope_axes(cfg: dict) -> tuple[int, int, int]:
    """Split the head dim into even (t, h, w) RoPE axes; Flux/Hunyuan need sum == head dim."""
    dim = cfg["attention_head_dim"]
    t = 2 * (dim // 8)
    h = 2 * ((dim - t) // 4)
    return (t, h, dim - t - h)


class _Maker:
    """Creates components with per-name seeds, so weights do not depend on build order."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, name: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        torch.manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
        # Freshly constructed models are in train mode; T5's dropout would make calls random.
        return factory().eval()


# ---------------------------------------------------------------- shared parts


def _clip(make: _Maker, name: str, with_projection: bool) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=tok.VOCAB_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=CLIP_PROJECTION,
        max_position_embeddings=77,
        bos_token_id=tok.VOCAB[tok.CLIP_BOS],
        eos_token_id=tok.VOCAB[tok.CLIP_EOS],
        pad_token_id=tok.VOCAB[tok.PAD],
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return make(name, lambda: cls(config))


def _t5(make: _Maker, name: str, umt5: bool = False) -> torch.nn.Module:
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=tok.VOCAB_SIZE,
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tok.VOCAB[tok.PAD],
        eos_token_id=tok.VOCAB[tok.T5_EOS],
        decoder_start_token_id=tok.VOCAB[tok.PAD],
    )
    return make(name, lambda: model_cls(config))


def _llama(make: _Maker, name: str) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=tok.VOCAB_SIZE,
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,  # HunyuanVideo reads hidden_states[-3]
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=tok.VOCAB[tok.LLAMA_BOS],
        eos_token_id=tok.VOCAB[tok.LLAMA_MARKERS[2]],
        pad_token_id=tok.VOCAB[tok.PAD],
    )
    return make(name, lambda: LlamaModel(config))


def _image_vae(make: _Maker, latent_channels: int, scaling_factor: float, shift_factor: float | None):
    """AutoencoderKL with 3 levels, i.e. 4x downsampling (the pipelines read it from the config)."""
    return make(
        "vae",
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        ),
    )


def _video_vae_blocks(kind: str) -> dict:
    """4 levels (8x spatial, as the pipelines assume) of 4 channels: full-resolution 3D convs
    dominate a tiny video call, so the VAE is kept as thin as possible."""
    return {
        "down_block_types": (f"{kind}DownBlock3D",) * 4,
        "up_block_types": (f"{kind}UpBlock3D",) * 4,
        "block_out_channels": (4, 4, 4, 4),
        "layers_per_block": 1,
        "norm_num_groups": 2,
    }


# ---------------------------------------------------------------- families


def _build_sd3(make: _Maker, transformer: dict) -> DiffusionPipeline:
    return StableDiffusion3Pipeline(
        transformer=make("transformer", lambda: SD3Transformer2DModel(**transformer)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        # SD3's latent normalisation subtracts shift_factor; None crashes the pipeline.
        vae=_image_vae(make, 16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip(make, "text_encoder", with_projection=True),
        tokenizer=tok.clip_tokenizer(),
        text_encoder_2=_clip(make, "text_encoder_2", with_projection=True),
        tokenizer_2=tok.clip_tokenizer(),
        text_encoder_3=_t5(make, "text_encoder_3"),
        tokenizer_3=tok.t5_tokenizer(),
    )


def _build_flux(make: _Maker, transformer: dict) -> DiffusionPipeline:
    return FluxPipeline(
        transformer=make("transformer", lambda: FluxTransformer2DModel(**transformer)),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_image_vae(make, 16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip(make, "text_encoder", with_projection=False),
        tokenizer=tok.clip_tokenizer(),
        text_encoder_2=_t5(make, "text_encoder_2"),
        tokenizer_2=tok.t5_tokenizer(),
    )


def _pixart_builder(pipeline_cls: type, vae_scaling_factor: float):
    def build(make: _Maker, transformer: dict) -> DiffusionPipeline:
        return pipeline_cls(
            transformer=make("transformer", lambda: PixArtTransformer2DModel(**transformer)),
            scheduler=DPMSolverMultistepScheduler(),
            vae=_image_vae(make, 4, scaling_factor=vae_scaling_factor, shift_factor=None),
            text_encoder=_t5(make, "text_encoder"),
            tokenizer=tok.t5_tokenizer(),
        )

    return build


def _build_dit(make: _Maker, transformer: dict) -> DiffusionPipeline:
    return DiTPipeline(
        transformer=make("transformer", lambda: DiTTransformer2DModel(**transformer)),
        vae=_image_vae(make, 4, scaling_factor=0.18215, shift_factor=None),
        scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False),
        id2label=DIT_ID2LABEL,
    )


def _build_wan(
    make: _Maker, transformer: dict, two_transformers: bool = False, boundary_ratio: float = 0.875
) -> DiffusionPipeline:
    """Wan 2.1 by default; ``two_transformers=True`` gives the Wan 2.2 high/low-noise expert pair."""
    return WanPipeline(
        transformer=make("transformer", lambda: WanTransformer3DModel(**transformer)),
        transformer_2=(
            make("transformer_2", lambda: WanTransformer3DModel(**transformer)) if two_transformers else None
        ),
        boundary_ratio=boundary_ratio if two_transformers else None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        vae=make(
            "vae",
            lambda: AutoencoderKLWan(
                base_dim=3,  # thin: full-resolution 3D convs dominate a tiny video call
                z_dim=transformer["in_channels"],
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.0] * transformer["in_channels"],
                latents_std=[1.0] * transformer["in_channels"],
            ),
        ),
        text_encoder=_t5(make, "text_encoder", umt5=True),
        tokenizer=tok.t5_tokenizer(),
    )


def _build_hunyuan_video(make: _Maker, transformer: dict) -> DiffusionPipeline:
    return HunyuanVideoPipeline(
        transformer=make("transformer", lambda: HunyuanVideoTransformer3DModel(**transformer)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=make(
            "vae",
            lambda: AutoencoderKLHunyuanVideo(
                latent_channels=transformer["in_channels"],
                spatial_compression_ratio=8,
                temporal_compression_ratio=4,
                **_video_vae_blocks("HunyuanVideo"),
            ),
        ),
        text_encoder=_llama(make, "text_encoder"),
        tokenizer=tok.llama_tokenizer(),
        text_encoder_2=_clip(make, "text_encoder_2", with_projection=False),
        tokenizer_2=tok.clip_tokenizer(),
    )


def _build_cogvideox(make: _Maker, transformer: dict) -> DiffusionPipeline:
    return CogVideoXPipeline(
        transformer=make("transformer", lambda: CogVideoXTransformer3DModel(**transformer)),
        # CogVideoX-2b's scheduler settings.
        scheduler=CogVideoXDDIMScheduler(
            beta_end=0.012,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            snr_shift_scale=3.0,
            timestep_spacing="trailing",
        ),
        vae=make(
            "vae",
            lambda: AutoencoderKLCogVideoX(
                latent_channels=transformer["in_channels"],
                temporal_compression_ratio=4,
                **_video_vae_blocks("CogVideoX"),
            ),
        ),
        text_encoder=_t5(make, "text_encoder"),
        tokenizer=tok.t5_tokenizer(),
    )


@dataclass(frozen=True)
class _Family:
    transformer_cls: type
    config: dict[str, Any]
    build: Callable[..., DiffusionPipeline]
    # Config keys computed from the others unless overridden (keeps e.g. head-count overrides valid).
    derived: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    # Pipeline-level overrides accepted by `build`, as opposed to transformer config keys.
    pipeline_options: tuple[str, ...] = ()


_PIXART_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,  # learned sigma, as in the real checkpoints
    num_layers=2,
    sample_size=32,
    patch_size=2,
    caption_channels=T5_D_MODEL,
)

_FAMILIES: dict[str, _Family] = {
    "sd3": _Family(
        SD3Transformer2DModel,
        dict(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=T5_D_MODEL,
            pooled_projection_dim=2 * CLIP_PROJECTION,
            pos_embed_max_size=64,  # images up to 512x512
        ),
        _build_sd3,
        derived={"caption_projection_dim": _inner_dim},
    ),
    "flux": _Family(
        FluxTransformer2DModel,
        dict(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=T5_D_MODEL,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=True,  # FLUX.1-dev style
        ),
        _build_flux,
        derived={"axes_dims_rope": _rope_axes},
    ),
    "pixart": _Family(
        PixArtTransformer2DModel,
        _PIXART_CONFIG,
        _pixart_builder(PixArtAlphaPipeline, vae_scaling_factor=0.18215),
        derived={"cross_attention_dim": _inner_dim},
    ),
    "pixart_sigma": _Family(
        PixArtTransformer2DModel,
        _PIXART_CONFIG,
        _pixart_builder(PixArtSigmaPipeline, vae_scaling_factor=0.13025),
        derived={"cross_attention_dim": _inner_dim},
    ),
    "dit": _Family(
        DiTTransformer2DModel,
        dict(
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=32,  # DiTPipeline has no height/width: this fixes 128x128 images
            patch_size=2,
            num_embeds_ada_norm=1000,  # the pipeline hard-codes 1000 as the null class
        ),
        _build_dit,
    ),
    "wan": _Family(
        WanTransformer3DModel,
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=T5_D_MODEL,
            freq_dim=64,
            ffn_dim=128,
            num_layers=2,
        ),
        _build_wan,
        pipeline_options=("two_transformers", "boundary_ratio"),
    ),
    "hunyuan_video": _Family(
        HunyuanVideoTransformer3DModel,
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=4,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            text_embed_dim=LLAMA_HIDDEN,
            pooled_projection_dim=CLIP_HIDDEN,
        ),
        _build_hunyuan_video,
        derived={"rope_axes_dim": _rope_axes},
    ),
    "cogvideox": _Family(
        CogVideoXTransformer3DModel,
        dict(
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=T5_D_MODEL,
            num_layers=2,
            sample_width=16,  # latent size of the default 128x128x9 video
            sample_height=16,
            sample_frames=9,
            patch_size=2,
            # Kept at the real 226: the transformer's position table is sized by it and the
            # pipeline pads every prompt to it, so a call without max_sequence_length works.
            max_text_seq_length=226,
        ),
        _build_cogvideox,
    ),
}


#: named variants: (family, transformer overrides) that make another release of the family's class
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # SD3.5 medium: dual attention (an image-only second attention) in the first blocks and RMS qk-norm;
    # 4 blocks so that skip-layer guidance has middle blocks to skip (`skip_guidance_layers=[1, 2]` play
    # SD3.5-medium's recommended [7, 8, 9] of 24)
    "sd3.5": ("sd3", dict(num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm")),
}


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise ValueError(f"Unknown family {family!r}; supported families: {', '.join(FAMILIES)}")
    return _FAMILIES[family]


def tiny_pipeline(family: str, *, seed: int = 0, variant: str | None = None, **overrides: Any) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of ``family`` (see ``FAMILIES``), fully offline.

    ``variant`` names a release of the family's transformer class (``VARIANTS``: ``"sd3.5"`` for
    ``"sd3"``). ``overrides`` update the transformer config (e.g. ``num_layers=4``; for SD3.5-style
    ``dual_attention_layers=(0,), qk_norm="rms_norm"``). Wan also accepts
    ``two_transformers=True`` (Wan 2.2: ``transformer_2`` plus ``boundary_ratio``) and
    ``boundary_ratio``. The same ``seed`` always gives the same weights, and the global
    torch RNG state is left untouched.
    """
    spec = _family(family)
    if variant is not None:
        if VARIANTS.get(variant, (None,))[0] != family:
            names = ", ".join(f"{name} ({of})" for name, (of, _) in VARIANTS.items())
            raise ValueError(f"Unknown variant {variant!r} of family {family!r}; variants: {names}")
        overrides = {**VARIANTS[variant][1], **overrides}
    allowed = set(inspect.signature(spec.transformer_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed - set(spec.pipeline_options))
    if unknown:
        raise ValueError(
            f"Unknown override(s) {unknown} for family {family!r}; valid keys are the "
            f"{spec.transformer_cls.__name__} config keys {sorted(allowed)}"
            + (f" and the pipeline options {list(spec.pipeline_options)}" if spec.pipeline_options else "")
        )
    options = {k: overrides.pop(k) for k in spec.pipeline_options if k in overrides}
    config = {**spec.config, **overrides}
    for key, derive in spec.derived.items():
        if key not in overrides:
            config[key] = derive(config)
    with torch.random.fork_rng(devices=[]):
        pipe = spec.build(_Maker(seed), config, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _hunyuan_crop_start() -> int:
    """Length of HunyuanVideo's template prefix in tiny-Llama tokens.

    The pipeline's default ``crop_start=95`` counts real Llama-3 tokens; the word-level
    tokenizer gives fewer, so the default would crop away the start of the prompt.
    """
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    return len(tok.llama_tokenizer()(prefix).input_ids)


def tiny_call_kwargs(family: str, **overrides: Any) -> dict[str, Any]:
    """Call arguments that make ``tiny_pipeline(family)(**kwargs)`` a quick, deterministic run.

    4 steps, ``output_type="pt"``, a fresh ``torch.Generator`` seeded 0, the default sizes
    of this module, and classifier-free guidance on where the pipeline batches it in
    (SD3, PixArt, DiT, Wan, CogVideoX). Flux and HunyuanVideo are guidance-distilled: their
    ``guidance_scale`` is embedded; pass ``negative_prompt=..., true_cfg_scale=2.0`` for
    their optional true CFG. ``overrides`` replace or add keys (e.g. ``width=192``,
    ``num_images_per_prompt=2``, ``prompt=[...]``). DiT batches via ``class_labels``;
    CogVideoXPipeline ignores ``num_videos_per_prompt``, so batch it with a prompt list.
    """
    _family(family)
    image = {"prompt": IMAGE_PROMPT, "height": 128, "width": 128, "max_sequence_length": 32}
    video = {"prompt": VIDEO_PROMPT, "height": 128, "width": 128, "num_frames": 9, "max_sequence_length": 32}
    pixart = {**image, "guidance_scale": 4.5, "clean_caption": False, "use_resolution_binning": False}
    defaults = {
        "sd3": {**image, "guidance_scale": 5.0},
        "flux": {**image, "guidance_scale": 3.5},
        "pixart": pixart,
        "pixart_sigma": pixart,
        "dit": {"class_labels": [1], "guidance_scale": 4.0},
        "wan": {**video, "guidance_scale": 5.0},
        "hunyuan_video": {
            **video,
            "guidance_scale": 6.0,
            "prompt_template": {**DEFAULT_PROMPT_TEMPLATE, "crop_start": _hunyuan_crop_start()},
        },
        # CogVideoX's transformer fixes the text length, so max_sequence_length stays at 226.
        "cogvideox": {**{k: v for k, v in video.items() if k != "max_sequence_length"}, "guidance_scale": 6.0},
    }[family]
    return {
        "num_inference_steps": 4,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(0),
        **defaults,
        **overrides,
    }


# ---------------------------------------------------------------- medium transformers

MEDIUM_FAMILIES = ("sd3", "wan", "pixart")
_MEDIUM_WIDTH = dict(num_layers=4, num_attention_heads=6, attention_head_dim=64)  # hidden 384
_MEDIUM: dict[str, dict[str, Any]] = {
    # sample_size: the 128x128 latent, as in the benchmarks these came from (for PixArt it also sets the
    # position-embedding scale and the resolution conditioning of the 1024-px checkpoints)
    "sd3": dict(_MEDIUM_WIDTH, sample_size=128),
    "wan": dict(_MEDIUM_WIDTH, ffn_dim=4 * 384),
    "pixart": dict(_MEDIUM_WIDTH, sample_size=128),
}
# 512x512 through the tiny image VAE (4x) and patch 2: 64x64 tokens; Wan: 13 frames of 512x512 through
# its VAE (4x time, 8x space) and patch (1, 2, 2): 4 x 32 x 32 tokens, with 64 text tokens
_MEDIUM_CALL: dict[str, dict[str, Any]] = {
    "sd3": dict(height=512, width=512),
    "wan": dict(height=512, width=512, num_frames=13, max_sequence_length=64),
    "pixart": dict(height=512, width=512),
}


def _medium(family: str) -> None:
    if family not in _MEDIUM:
        raise ValueError(f"Unknown medium family {family!r}; supported: {', '.join(MEDIUM_FAMILIES)}")


def medium_pipeline(family: str, *, seed: int = 0, **overrides: Any) -> DiffusionPipeline:
    """``tiny_pipeline(family)`` with a medium transformer of the same class (see the module doc);
    ``overrides`` update its config as in ``tiny_pipeline``."""
    _medium(family)
    return tiny_pipeline(family, seed=seed, **{**_MEDIUM[family], **overrides})


def medium_call_kwargs(family: str, **overrides: Any) -> dict[str, Any]:
    """A call of ``medium_pipeline(family)`` at 4,096 tokens, 20 steps, batch 1 and no CFG: one
    transformer pass a step, the bare denoising loop the RAS speed table was measured on."""
    _medium(family)
    return tiny_call_kwargs(family, **{"num_inference_steps": 20, "guidance_scale": 1.0,
                                       **_MEDIUM_CALL[family], **overrides})


# ---------------------------------------------------------------- releases at full width

@dataclass(frozen=True)
class Release:
    """A released transformer's config (its diffusers config.json) and what its pipeline feeds it."""

    transformer_cls: type
    config: dict[str, Any]
    pipeline_cls: type
    #: text tokens its pipeline passes: (T5 / umT5 sequence length, CLIP tokens concatenated to it)
    text_tokens: tuple[int, int]
    #: whether its pipeline also passes pooled text embeddings (SD3: its two CLIP projections)
    pooled_text: bool = False


_WAN_2_1 = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
RELEASES: dict[str, Release] = {
    "wan2.1-1.3b": Release(WanTransformer3DModel, dict(_WAN_2_1, num_attention_heads=12, ffn_dim=8960, num_layers=30),
                           WanPipeline, (512, 0)),
    "wan2.1-14b": Release(WanTransformer3DModel, dict(_WAN_2_1, num_attention_heads=40, ffn_dim=13824, num_layers=40),
                          WanPipeline, (512, 0)),
    "sd3.5-medium": Release(SD3Transformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        StableDiffusion3Pipeline, (256, 77), pooled_text=True),
    # transformer configs only (`release_transformer`, on the meta device for memory estimates)
    "flux.1-dev": Release(FluxTransformer2DModel, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), FluxPipeline, (512, 0)),
    "hunyuanvideo": Release(HunyuanVideoTransformer3DModel, dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56)), HunyuanVideoPipeline, (256, 0)),
}


def _release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"Unknown release {name!r}; known: {', '.join(RELEASES)}")
    return RELEASES[name]


def release_transformer(name: str, *, seed: int = 0, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A random-weight transformer with release `name`'s config (`RELEASES`), `overrides` on top
    (``num_layers=2``: fewer blocks; ``num_attention_heads=2``: fewer heads for a CPU), its weights
    made on `device` (a 14B block never passes through host memory) and cast to `dtype`. SD3's caption
    projection follows the head count unless overridden. The global torch RNG state is left untouched."""
    release = _release(name)
    config = {**release.config, **overrides}
    if release.transformer_cls is SD3Transformer2DModel and "caption_projection_dim" not in overrides:
        config["caption_projection_dim"] = _inner_dim(config)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
        transformer = release.transformer_cls(**config).eval().requires_grad_(False)
    # as from_pretrained(torch_dtype=...) loads it: the modules the class keeps in float32 stay there
    kept = getattr(transformer, "_keep_in_fp32_modules", None) or []
    for tensor_name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if tensor.is_floating_point() and not any(module in tensor_name.split(".") for module in kept):
            tensor.data = tensor.data.to(dtype)
    return transformer


def release_pipeline(name: str, transformer: torch.nn.Module) -> DiffusionPipeline:
    """Release `name`'s pipeline around `transformer` with its scheduler and no text encoders or VAE:
    call it with `release_call_kwargs` (prompt embeddings given, latents out)."""
    release = _release(name)
    if release.pipeline_cls not in (WanPipeline, StableDiffusion3Pipeline):
        raise ValueError(f"release {name!r}: its transformer's config only (release_transformer)")
    if release.pipeline_cls is WanPipeline:
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        pipe = WanPipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None)
    else:
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def release_call_kwargs(name: str, transformer: torch.nn.Module, *, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Call arguments of `release_pipeline(name, transformer)`: random prompt embeddings (and negative
    ones under CFG) of the release's text lengths and the transformer's text widths, on its device and
    dtype, seeded; latents out. `overrides` (height, width, num_frames, steps, guidance) go on top."""
    release = _release(name)
    config = transformer.config
    width = config.text_dim if release.pipeline_cls is WanPipeline else config.joint_attention_dim
    generator = torch.Generator().manual_seed(seed)

    def embeddings(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(transformer.device, transformer.dtype)

    kwargs: dict[str, Any] = {"prompt_embeds": embeddings(1, sum(release.text_tokens), width),
                              "negative_prompt_embeds": embeddings(1, sum(release.text_tokens), width),
                              "output_type": "latent", "generator": torch.Generator().manual_seed(seed)}
    if release.pooled_text:
        pooled = config.pooled_projection_dim
        kwargs |= {"pooled_prompt_embeds": embeddings(1, pooled),
                   "negative_pooled_prompt_embeds": embeddings(1, pooled)}
    return {**kwargs, **overrides}


def wan_inputs(transformer: torch.nn.Module, grid: tuple[int, int, int], text_tokens: int, *, batch: int = 1,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents and text embeddings of one direct call of a Wan transformer (add `timestep`), on its
    device and dtype: `grid` is (latent frames, token rows, token cols) after its (1, 2, 2) patch."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    frames, rows, cols = grid
    latents = torch.randn(batch, config.in_channels, frames, rows * config.patch_size[1], cols * config.patch_size[2],
                          generator=generator)
    text = torch.randn(batch, text_tokens, config.text_dim, generator=generator)
    # `dtype`: the weights' (modules kept in float32 aside), as the pipeline casts its inputs
    return {"hidden_states": latents.to(transformer.device, transformer.dtype),
            "encoder_hidden_states": text.to(transformer.device, transformer.dtype)}
