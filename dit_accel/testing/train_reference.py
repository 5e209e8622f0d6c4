"""Train the shipped reference pipelines from scratch on procedural data, on the CPU.

    python -m dit_accel.testing.train_reference --model image --out DIR --minutes 55 --seed 0
    python -m dit_accel.testing.train_reference --model video --out DIR --minutes 92 --vae-share 0.13 --threads 2

Each run builds a real diffusers pipeline (SD3 for images, Wan 2.1 for videos) with seeded
random text encoders (frozen) and an in-process word-level tokenizer, trains the VAE for a
share of the budget, then trains the transformer with the rectified-flow objective exactly as
the pipeline samples it: ``x_t = (1 - sigma) * x0 + sigma * noise``, target ``noise - x0``,
``timestep = sigma * 1000``, sigmas drawn like ``FlowMatchEulerDiscreteScheduler(shift=3)``
spaces them, and 10% empty captions so classifier-free guidance with the pipelines' default
empty negative prompt works. The video transformer mixes whole-clip steps with cheaper first-frame
steps (see ``first_frame_share``). The budget is wall-clock; ``--steps`` fixes the step counts
instead (the run's counts are written to ``train_log.json``): two ``--steps`` runs are bit-exact,
and one replays a timed run closely (its schedules then follow the step count, not the clock).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from dit_accel.metrics import detail_scenes, procedural

TEXT_LEN = 16  # tokens per text encoder; every caption fits (at most 15 words + </s>)
IMAGE_SIZE = 64
NUM_FRAMES = 13  # 7 latent frames with the 2x temporal VAE
FLOW_SHIFT = 3.0
CAPTION_DROPOUT = 0.1
DIT_BATCH = {"image": 32, "clips": 4, "first_frames": 16, "detail": 16, "detail_low_res": 32}  # samples per step
DETAIL_SIZE = detail_scenes.IMAGE_SIZE
DETAIL_VAE_CROP = 64  # the detail VAE is fully convolutional up to its mid-block: it trains on crops
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a caption vocabulary (the procedural one by default), ending every prompt
    with </s>."""
    vocab = {w: i for i, w in enumerate(SPECIALS + (words or procedural.vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=TEXT_LEN)


def _clip(seed: int, vocab_size: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LEN, projection_dim=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = CLIPTextModelWithProjection(cfg)
    # Unit-scale embeddings: CLIP's 0.02 init would hand the DiT near-constant text features.
    emb = model.text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0.0, 1.0)
        emb.position_embedding.weight.normal_(0.0, 1.0)
    return model.eval()


def _t5(seed: int, vocab_size: int, umt5: bool) -> T5EncoderModel | UMT5EncoderModel:
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    if not umt5:
        return T5EncoderModel(T5Config(**kw)).eval()
    model = UMT5EncoderModel(UMT5Config(**kw))
    # T5 has no absolute positions, and at its default init the relative-position attention is nearly
    # uniform, so its outputs are a bag of words: "a purple circle, white background" and "a white circle,
    # purple background" would condition the DiT the same. Sharper position biases and a stronger attention
    # output give every word its neighbours' context (the video DiT only sees this encoder).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.encoder.block:
            attention = block.layer[0].SelfAttention
            attention.relative_attention_bias.weight.normal_(0.0, 2.0, generator=gen)
            attention.o.weight.mul_(2.0)
    return model.eval()


def _sd3_pipeline(seed: int, words: list[str], image_size: int, latent_channels: int,
                  heads: int) -> StableDiffusion3Pipeline:
    """Untrained SD3 pipeline: a 2x VAE, a transformer of 6 joint blocks of ``heads`` x 32 with patch 2
    (image_size / 4 squared image tokens), and three seeded text encoders over ``words``."""
    tok = build_tokenizer(words)
    n = len(tok)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=8, sample_size=image_size,
                        scaling_factor=1.0, shift_factor=0.0)
    transformer = SD3Transformer2DModel(sample_size=image_size // 2, patch_size=2, in_channels=latent_channels,
                                        out_channels=latent_channels, num_layers=6, attention_head_dim=32,
                                        num_attention_heads=heads, joint_attention_dim=128,
                                        caption_projection_dim=32 * heads, pooled_projection_dim=128,
                                        pos_embed_max_size=32, qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), vae=vae,
        text_encoder=_clip(seed + 1, n), tokenizer=tok, text_encoder_2=_clip(seed + 2, n),
        tokenizer_2=build_tokenizer(words), text_encoder_3=_t5(seed + 3, n, umt5=False),
        tokenizer_3=build_tokenizer(words))


def build_image_pipeline(seed: int) -> StableDiffusion3Pipeline:
    """Untrained SD3 pipeline: 64x64 images, 4x32x32 latents, 256 image tokens + 32 text tokens, hidden 128."""
    return _sd3_pipeline(seed, procedural.vocabulary(), IMAGE_SIZE, latent_channels=4, heads=4)


def build_detail_pipeline(seed: int) -> StableDiffusion3Pipeline:
    """Untrained SD3 pipeline for the detail scenes: 128x128 images, 8x64x64 latents, 1,024 image tokens + 32
    text tokens, hidden 192."""
    return _sd3_pipeline(seed, detail_scenes.vocabulary(), DETAIL_SIZE, latent_channels=8, heads=6)


def build_video_pipeline(seed: int) -> WanPipeline:
    """Untrained Wan 2.1 pipeline: 13x64x64 videos, 16x7x16x16 latents, 1792 video tokens + 16 text tokens.

    The VAE uses Wan 2.2's layout at a small size (2x2 pixel patchify, residual down/up blocks whose
    average-pool / duplicate shortcuts make it a decent autoencoder from the first step, one stage that
    halves space and time), so it trains on full 13-frame clips on a CPU in minutes; the transformer then
    sees every latent pixel as a token (patch 1x1x1).
    """
    tok = build_tokenizer()
    torch.manual_seed(seed)
    z_dim = 16
    vae = AutoencoderKLWan(base_dim=16, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_temporal=2, scale_factor_spatial=4,
                           latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    transformer = WanTransformer3DModel(patch_size=(1, 1, 1), num_attention_heads=3, attention_head_dim=32,
                                        in_channels=z_dim, out_channels=z_dim, text_dim=128, freq_dim=64,
                                        ffn_dim=384, num_layers=4, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    return WanPipeline(tokenizer=tok, text_encoder=_t5(seed + 1, len(tok), umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), transformer=transformer)


def _pixels(kind: str, batch: int, seed: int, num_frames: int = NUM_FRAMES,
            size: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """A procedural batch in [-1, 1]: images (B, 3, H, W) or videos (B, 3, T, H, W)."""
    if kind == "image":
        x, scenes = procedural.image_batch(batch, seed, IMAGE_SIZE)
    elif kind == "detail":
        x, scenes = detail_scenes.image_batch(batch, seed, size or DETAIL_SIZE)
    else:
        x, scenes = procedural.video_batch(batch, seed, num_frames, IMAGE_SIZE)
    return x * 2 - 1, [s.caption for s in scenes]


def train_vae(vae, kind: str, budget_s: float, max_steps: int | None, seed: int, log: dict) -> None:
    """Reconstruction (L1 + MSE) plus a tiny KL term, on whole images or whole 13-frame videos."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    batch = 4 if kind == "video" else 16
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    start, step, losses = time.time(), 0, []
    while (time.time() - start < budget_s) if max_steps is None else step < max_steps:
        x, _ = _pixels(kind, batch, seed * 1_000_003 + step)
        if kind == "detail":  # random crops: the same local detail at a quarter of the cost
            top, left = (int(i) for i in torch.randint(0, DETAIL_SIZE - DETAIL_VAE_CROP + 1, (2,), generator=gen))
            x = x[..., top:top + DETAIL_VAE_CROP, left:left + DETAIL_VAE_CROP]
        x = x.to(vae.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * posterior.kl().mean() / posterior.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"[vae {kind}] step {step} loss {np.mean(losses[-50:]):.4f} {time.time() - start:.0f}s", flush=True)
    vae.eval()
    log["vae_steps"], log["vae_seconds"], log["vae_final_loss"] = step, time.time() - start, float(np.mean(losses[-50:]))


@torch.no_grad()
def calibrate_latents(pipe, kind: str, seed: int) -> None:
    """Set the VAE's latent normalisation from data, as SD3/Wan do: unit variance for the transformer."""
    x, _ = _pixels(kind, 16 if kind == "video" else 64, seed + 777)
    mu = pipe.vae.encode(x.to(pipe.vae.device)).latent_dist.mean
    if kind != "video":
        pipe.vae.register_to_config(shift_factor=float(mu.mean()), scaling_factor=float(1.0 / mu.std()))
    else:
        dims = (0, 2, 3, 4)
        pipe.vae.register_to_config(latents_mean=mu.mean(dims).tolist(), latents_std=mu.std(dims).tolist())


@torch.no_grad()
def encode_batch(pipe, kind: str, x: torch.Tensor, captions: list[str], gen: torch.Generator) -> tuple:
    """Normalised latents and the text conditioning exactly as the pipeline computes them."""
    posterior = pipe.vae.encode(x).latent_dist
    # Video latents are posterior means: the Wan VAE's fixed small KL weight leaves a posterior noise
    # that the video DiT would otherwise spend its short budget modelling.
    z = posterior.sample(generator=gen) if kind != "video" else posterior.mode()
    if kind != "video":
        cfg = pipe.vae.config
        z = (z - cfg.shift_factor) * cfg.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
        return z, {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    mean = torch.tensor(pipe.vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
    return (z - mean) / std, {"encoder_hidden_states": embeds}


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform in the unshifted schedule, then shifted: the sigma density the Euler sampler visits."""
    u = torch.rand(n, generator=gen)
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def first_frame_share(progress: float) -> float:
    """Share of video-DiT steps trained on first frames alone, 0.75 falling to 0.25 over the run.

    A first frame is one latent frame (the Wan VAE is causal: it encodes frame 0 on its own), so it is
    the same data as a clip's first latent frame at 1/7 of the tokens and ~1/16 of the cost per sample.
    Early steps learn shape, color and the start position each motion implies (as image models learn
    layout) cheaply; later ones spend the budget on whole clips, where the trajectory is learned.
    """
    return 0.75 - 0.5 * progress


def train_transformer(pipe, kind: str, budget_s: float, max_steps: int | None, seed: int, log: dict,
                      low_res: float | int = 0.0) -> None:
    """Rectified flow with cosine LR over the budget and an EMA copy that becomes the shipped weights.

    Detail images train progressively: first at half size (64x64, 256 tokens, about 6x cheaper per sample:
    layout, colors and shapes), then at full size (128x128, 1,024 tokens: the textures). ``low_res`` is
    the share of the wall-clock budget at half size, or, with ``max_steps``, the number of half-size steps.
    """
    model = pipe.transformer
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, step, losses, first_frame_steps, low_res_steps = time.time(), 0, [], 0, 0
    while True:
        progress = (time.time() - start) / budget_s if max_steps is None else step / max_steps
        if progress >= 1:
            break
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        first_frame = kind == "video" and float(torch.rand(1, generator=gen)) < first_frame_share(progress)
        half_size = kind == "detail" and (step < low_res if max_steps is not None
                                          else time.time() - start < low_res * budget_s)
        batch = DIT_BATCH[("detail_low_res" if half_size else "detail") if kind == "detail" else
                          "image" if kind == "image" else "first_frames" if first_frame else "clips"]
        first_frame_steps += first_frame
        low_res_steps += half_size
        x, captions = _pixels(kind, batch, seed * 1_000_003 + 500_000 + step, 1 if first_frame else NUM_FRAMES,
                              DETAIL_SIZE // 2 if half_size else None)
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0, cond = encode_batch(pipe, kind, x.to(model.device), captions, gen)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)  # drawn on the CPU: the same on every device
        sigma = sample_sigmas(batch, gen).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - sigma) * x0 + sigma * noise
        pred = model(hidden_states=xt, timestep=sigma.flatten() * 1000, return_dict=False, **cond)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(f"[dit {kind}] step {step} loss {np.mean(losses[-25:]):.4f} lr {lr:.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
    pipe.transformer = ema.eval()
    log["dit_steps"], log["dit_seconds"] = step, time.time() - start
    log["dit_final_loss"] = float(np.mean(losses[-100:]))
    if kind == "image":
        log["dit_batch"] = DIT_BATCH["image"]
    elif kind == "detail":
        log["dit_batch"] = {k: DIT_BATCH[k] for k in ("detail", "detail_low_res")}
        log["dit_low_res_steps"] = low_res_steps
    else:
        log["dit_batch"] = {k: DIT_BATCH[k] for k in ("clips", "first_frames")}
        log["dit_first_frame_steps"] = first_frame_steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["image", "detail", "video"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=30.0, help="total wall-clock budget (VAE + transformer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-share", type=float, help="fraction of the budget for the VAE (0.15 image, 0.2 video)")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("VAE", "DIT"), help="fixed step counts instead")
    parser.add_argument("--transformer-from", type=Path,
                        help="start the transformer from an earlier run's output folder (e.g. the shipped model) "
                             "instead of random weights: a longer training in several sittings; use with --vae-from")
    parser.add_argument("--low-res", type=float, default=0.3,
                        help="detail: share of the transformer's budget at half size (with --steps: a step count, "
                             "the run's dit_low_res_steps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where to train (e.g. cuda); data is drawn on the CPU")
    parser.add_argument("--vae-from", type=Path, help="reuse the trained VAE of an earlier run's output folder; "
                                                      "--minutes is then the transformer's budget")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kind, budget = args.model, args.minutes * 60
    pipe = {"image": build_image_pipeline, "detail": build_detail_pipeline, "video": build_video_pipeline}[kind](args.seed)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    log = {"model": kind, "seed": args.seed, "minutes": args.minutes, "threads": args.threads, "device": args.device}
    t0 = time.time()
    vae_steps, dit_steps = args.steps or (None, None)
    if args.vae_from:  # the VAE does not depend on the transformer: reuse one this script trained
        trained = type(pipe.vae).from_pretrained(args.vae_from / "vae")
        pipe.vae.load_state_dict(trained.state_dict())  # strict: the architecture this script builds
        normalisation = ("latents_mean", "latents_std") if kind == "video" else ("shift_factor", "scaling_factor")
        pipe.vae.register_to_config(**{key: trained.config[key] for key in normalisation})
        vae_log = json.loads((args.vae_from / "train_log.json").read_text())
        log.update({k: v for k, v in vae_log.items() if k.startswith("vae_")}, vae_from=str(args.vae_from))
    else:
        vae_share = args.vae_share or {"image": 0.15, "detail": 0.1, "video": 0.2}[kind]
        train_vae(pipe.vae, kind, budget * vae_share, vae_steps, args.seed, log)
        calibrate_latents(pipe, kind, args.seed)
    pipe.vae.requires_grad_(False)
    if args.transformer_from:
        trained = type(pipe.transformer).from_pretrained(args.transformer_from / "transformer")
        pipe.transformer.load_state_dict(trained.state_dict())  # strict; float16 weights load as float32
        log["transformer_from"] = str(args.transformer_from)
    train_transformer(pipe, kind, budget - (time.time() - t0), dit_steps, args.seed, log, args.low_res)
    log["total_seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu")
    if kind == "detail":  # stored in float16 to keep the assets small; from_pretrained loads it as float32
        pipe.transformer.to(torch.float16)
    pipe.save_pretrained(args.out, safe_serialization=True)
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
