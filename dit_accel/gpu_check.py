"""`dit-accel gpu-check`: does every technique run on this device, agree with dense, and pay off at the
shapes users run? One command, offline (random weights, embedded tiny tokenizers), at most 8 minutes on
one H100, JSON and markdown out.

- families: every tiny pipeline (`testing.tiny`) on the device in bf16 (fp32 with --small), under each
  SDPA backend stages 5-6 declare (`SDPA_BACKENDS`; one the device lacks is reported, not fatal): every
  technique's `keep_all()` equals dense (relative L2 error of the output latents, `TOLERANCE`), on SD3
  and Wan under the default backend for each of its `kernel` values too, and every preset runs (finite
  output).
- layer: one attention layer at Wan 2.1 1.3B and 14B 480p x 81 frames (12 / 40 heads x 128, 21 x 30 x
  52 = 32,760 tokens, 512 text tokens): dense SDPA alone and through the runtime, against SVG2 and proxy
  attention presets and FlexDiT's pooled K/V, through the techniques at a step past their dense warm-up,
  for each value of their `kernel` field; the attention module's time (CUDA events; perf_counter on a
  CPU), its FLOPs against dense from the ledger, and the peak memory above the call's start.
- models: random-weight transformers at full width in their pipelines (SD3.5-medium at 1024², CFG
  batched; Wan 2.1 1.3B at 480p x 81 frames, one call a step): dense against RAS, SVG2, proxy attention
  and RAS + FirstBlockCache, each a whole run: time, the ledger's FLOPs ratio, peak memory.

Only the public configs are used (presets, `keep_all()`, `for_steps`), so the check follows the kernels
as they change. `--small` is the same check on a CPU in seconds (what the test suite runs): fp32 and the
reductions in `SMALL`, only the presets' default kernel in the layer part, presets under the default
backend only. Each part gets a share of `--time-limit` (a third, half of what is left, the rest), so
one slow part (a kernel compiling per shape) cannot starve the others; rows past it are skipped, said
so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import statistics
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import diffusers
import torch
import torch.nn.functional as F
from diffusers.hooks import FirstBlockCacheConfig

from .api import apply, measure
from .config import AccelerationConfig, ConfigError
from .loading import UsageError
from .machine import machine
from .runtime.attention_route import SDPA_BACKENDS
from .runtime.registry import plan_members
from .techniques import FlexDiTConfig, ProxyAttentionConfig, RASConfig, SVG2Config
from .testing import (FAMILIES, RELEASES, release_call_kwargs, release_pipeline, release_transformer,
                      tiny_call_kwargs, tiny_pipeline, wan_inputs)

PARTS = ("families", "layer", "models")
#: keep-all vs dense: largest relative L2 error of the output latents. bf16 rounds every op to 2^-9 and the
#: kernels sum in another order than dense SDPA: measured on a CPU in bf16 over 4 steps, up to 1.5e-2
#: (CogVideoX's proxy attention), 0 where the path reorders nothing (RAS, DyDiT)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
#: statuses that fail the check (a keep-all that differs from dense, or a crash); "out of memory",
#: "unavailable", "refused" (a config the device cannot run, by name) and "skipped" do not
FAILED = ("mismatch", "error")
LAYER_MODELS = ("wan2.1-1.3b", "wan2.1-14b")
#: Wan 2.1 at 480p x 81 frames: (latent frames, token rows, token cols); its umT5 text length
WAN_480P = dict(grid=(21, 30, 52), text_tokens=512)
#: what --small changes, per part (heads and blocks of the releases, grids, steps)
SMALL = {
    "families": ("sd3", "wan"),
    "kernel_families": (),
    "families_steps": 2,
    "layer": {"wan2.1-1.3b": dict(num_attention_heads=1), "wan2.1-14b": dict(num_attention_heads=2),
              "common": dict(ffn_dim=512, text_dim=64), "grid": (2, 30, 52), "text_tokens": 16},
    "models": {"sd3.5-medium": (dict(num_layers=2, num_attention_heads=4, joint_attention_dim=64,
                                     pooled_projection_dim=64), dict(height=512, width=512)),
               "wan2.1-1.3b": (dict(num_layers=2, num_attention_heads=2, ffn_dim=512, text_dim=64),
                               dict(height=480, width=832, num_frames=5))},
    "models_steps": 4,
    "layer_repeats": 1,
}
FULL = {
    "families": FAMILIES,
    #: where keep-all runs under each `kernel` value too (a compiled kernel compiles per shape): joint
    #: attention with text first (SD3) and image-only video attention (Wan)
    "kernel_families": ("sd3", "wan"),
    "families_steps": 4,
    "models": {"sd3.5-medium": (dict(), dict(height=1024, width=1024)),
               "wan2.1-1.3b": (dict(), dict(height=480, width=832, num_frames=81))},
    "models_steps": 8,
    "layer_repeats": 3,
}
#: the models part: guidance per release (SD3.5 batches CFG into one call; Wan runs one call a step here,
#: its uncond call left out to halve the time)
MODEL_GUIDANCE = {"sd3.5-medium": 5.0, "wan2.1-1.3b": 1.0}
#: the layer part's step schedule: the presets' dense warm-up is at most half of it
LAYER_STEPS = 20


@dataclass
class Check:
    """One run of the check: where it runs, its deadline, and the rows so far."""

    device: torch.device
    dtype: torch.dtype
    small: bool
    #: perf_counter() after which the running part's rows are skipped
    deadline: float
    say: Callable[[str], None]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sizes(self) -> dict[str, Any]:
        return SMALL if self.small else FULL

    def attempt(self, row: dict[str, Any], work: Callable[[dict[str, Any]], None], *,
                keep_ok: bool = True) -> dict[str, Any]:
        """Append `row`, then fill it by `work(row)` unless the time limit passed; a crash or an
        out-of-memory becomes its status, with where it happened. `keep_ok=False`: the row stays only
        if the work did not go through (a set-up step)."""
        self.rows.append(row)
        if time.perf_counter() > self.deadline:
            row.update(status="skipped", detail="time limit")
            return row
        row["status"] = "ok"
        started = time.perf_counter()
        try:
            work(row)
        except torch.OutOfMemoryError as error:
            row.update(status="out of memory", detail=str(error).splitlines()[0])
        except ConfigError as error:
            row.update(status="refused", detail=str(error))
        except Exception as error:  # noqa: BLE001 - every failure is a row of the report, not the end of it
            row.update(status="error", detail=f"{type(error).__name__}: {str(error)[:400]} ({_where(error)})",
                       trace=traceback.format_exc(limit=-12))
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            row["wall_s"] = time.perf_counter() - started
        if row["status"] == "ok" and not keep_ok:
            self.rows.remove(row)
        return row


def _where(error: BaseException) -> str:
    """The innermost frame of `error`, and the innermost in dit_accel when that is another one."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "dit_accel" in f.filename and not f.filename.endswith("gpu_check.py")]
    places = [frames[-1]] + ([ours[-1]] if ours and ours[-1] is not frames[-1] else [])
    return "; ".join(f"{Path(f.filename).name}:{f.lineno}" for f in places)


# -- measuring ---------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """{"peak_mib": the most allocated within the block above what was allocated at its start}; None off CUDA."""
    found: dict[str, float | None] = {"peak_mib": None}
    if device.type != "cuda":
        yield found
        return
    _synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield found
    _synchronize(device)
    found["peak_mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20


def _mark(device: torch.device) -> Any:
    """A point in time on `device`'s stream: a recorded CUDA event, or perf_counter() on a CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(begin: Any, end: Any) -> float:
    """Milliseconds between two `_mark`s (CUDA events: after a synchronize)."""
    return begin.elapsed_time(end) if isinstance(begin, torch.cuda.Event) else 1000 * (end - begin)


@contextlib.contextmanager
def _module_times(module: torch.nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Milliseconds of each forward call of `module` within the block, filled in when the block ends."""
    times: list[float] = []
    starts: list[Any] = []
    ends: list[Any] = []
    handles = [module.register_forward_pre_hook(lambda *_: starts.append(_mark(device))),
               module.register_forward_hook(lambda *_: ends.append(_mark(device)))]
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()
        _synchronize(device)
        times += [_elapsed_ms(begin, end) for begin, end in zip(starts, ends)]


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


def kernel_values(config_class: type) -> tuple[str, ...]:
    """The values of a config's `kernel` field (its Literal), or () for a config without one."""
    hint = typing.get_type_hints(config_class).get("kernel")
    return typing.get_args(hint) if hint is not None else ()


def _with_kernel(config: AccelerationConfig, kernel: str | None) -> AccelerationConfig:
    return config if kernel is None else dataclasses.replace(config, kernel=kernel)


def technique_classes() -> list[type[AccelerationConfig]]:
    """dit-accel's own plan members (diffusers' caches have no keep-all)."""
    return [r.config_class for r in plan_members() if issubclass(r.config_class, AccelerationConfig)
            and r.config_class.__module__.startswith("dit_accel.")]


# -- families: keep-all equals dense, presets run, under every SDPA backend ----------------------------

def backend_obstacle(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the diffusers backend `backend` cannot run attention on this device in `dtype` (None: it can)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    query = torch.randn(1, 64, 2, 64, device=device, dtype=dtype)
    try:
        dispatch_attention_fn(query, query, query, backend=backend)
    except Exception as error:  # noqa: BLE001 - the device's own refusal is the answer
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def _generate(pipe: Any, family: str, steps: int) -> torch.Tensor:
    """One tiny generation, its output latents (DiT: its images) on the CPU."""
    output = pipe(**tiny_call_kwargs(family, num_inference_steps=steps, output_type="pt" if family == "dit"
                                     else "latent"))
    return torch.as_tensor(output.frames if hasattr(output, "frames") else output.images).float().cpu()


def check_families(check: Check) -> None:
    """In three passes, so that the time limit cuts the least telling rows: dense and every keep-all under
    every backend; keep-all under each `kernel` value; the presets."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    steps, tolerance = check.sizes["families_steps"], TOLERANCE[check.dtype]
    techniques = technique_classes()
    backends = []
    for backend in SDPA_BACKENDS:
        obstacle = backend_obstacle(backend, check.device, check.dtype)
        if obstacle is None:
            backends.append(backend)
        else:
            check.rows.append({"part": "families", "family": "-", "backend": backend, "plan": "-", "check": "backend",
                               "status": "unavailable", "detail": obstacle})
    pipes = {family: tiny_pipeline(family).to(device=check.device, dtype=check.dtype)
             for family in check.sizes["families"]}
    dense: dict[tuple[str, str], torch.Tensor] = {}

    def under(family: str, backend: str) -> dict[str, Any]:
        pipes[family].transformer.set_attention_backend(backend)
        return {"part": "families", "family": family, "backend": backend}

    active = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        for family, backend in [(f, b) for f in pipes for b in backends]:
            check.say(f"families: {family} under {backend}: dense and keep-all")
            base, pipe = under(family, backend), pipes[family]
            row = check.attempt({**base, "plan": "dense", "check": "dense"}, lambda row: dense.setdefault(
                (family, backend), _generate(pipe, family, steps)))
            if row["status"] == "error":  # the backend cannot run this model at all: not ours to check
                row.update(status="unavailable", detail=f"dense fails: {row['detail']}")
            if (family, backend) in dense:
                for config_class in techniques:
                    _keep_all_row(check, pipe, family, steps, base, config_class, None, dense[family, backend],
                                  tolerance)
        for family in [f for f in check.sizes["kernel_families"] if (f, "native") in dense]:
            check.say(f"families: {family}: keep-all under each kernel")
            base = under(family, "native")
            for config_class in techniques:
                for kernel in kernel_values(config_class):
                    _keep_all_row(check, pipes[family], family, steps, base, config_class, kernel,
                                  dense[family, "native"], tolerance)
        for family, backend in [key for key in dense if not check.small or key[1] == "native"]:
            check.say(f"families: {family} under {backend}: presets")
            base = under(family, backend)
            for config_class in techniques:
                for preset in config_class.presets:
                    check.attempt({**base, "plan": f"{config_class.name}:preset={preset}", "check": "preset"},
                                  lambda row, c=config_class, p=preset: _preset_runs(pipes[family], family, steps,
                                                                                     c.preset(p)))
    finally:
        for pipe in pipes.values():
            pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


def _keep_all_row(check: Check, pipe: Any, family: str, steps: int, base: dict, config_class: type, kernel: str | None,
                  dense: torch.Tensor, tolerance: float) -> None:
    def run(row: dict[str, Any]) -> None:
        with apply(pipe, _with_kernel(config_class.keep_all(), kernel)):
            error = _relative_error(_generate(pipe, family, steps), dense)
        row["error"] = error
        if not error <= tolerance:
            row.update(status="mismatch", detail=f"relative error {error:.2e} > {tolerance:.0e}")

    check.attempt({**base, "plan": f"{config_class.name}.keep_all()", "check": "keep_all",
                   "kernel": kernel or "default"}, run)


def _preset_runs(pipe: Any, family: str, steps: int, config: AccelerationConfig) -> None:
    with apply(pipe, config):
        if not torch.isfinite(_generate(pipe, family, steps)).all():
            raise FloatingPointError("non-finite output")


# -- layer: one attention layer at Wan 480p shapes ----------------------------------------------------

def layer_configs(small: bool) -> list[tuple[str, AccelerationConfig]]:
    """(plan spec, config): SVG2's and proxy attention's presets (--small: the balanced ones) as a user runs
    them, which may decide that a layer cannot save and run it dense (random weights attend diffusely);
    the balanced ones with `plan_every_layer`, which run the sparse kernel whatever it saves; FlexDiT's
    pooled K/V."""
    configs = []
    for name, config_class in (("svg2", SVG2Config), ("proxy", ProxyAttentionConfig)):
        configs += [(f"{name}:preset={p}", config_class.preset(p))
                    for p in (("balanced",) if small else config_class.presets)]
        configs.append((f"{name}:preset=balanced,plan_every_layer=True",
                        config_class.preset("balanced", plan_every_layer=True)))
    return configs + [("flexdit:preset=quality", FlexDiTConfig.preset("quality"))]


def _wan_call(transformer, inputs: dict, step: int, steps: int) -> None:
    """One transformer call with the step context Wan's pipeline sets."""
    sigma = 1.0 - step / steps
    with transformer.cache_context("cond", step_index=step, num_inference_steps=steps, sigma=sigma):
        transformer(**inputs, timestep=torch.tensor([1000.0 * sigma], device=transformer.device),
                    return_dict=False)


def _attention_flops(call: dict[str, Any]) -> float:
    """A call's self-attention FLOPs in the ledger, the technique's planning (overhead) included."""
    return call["work"].get("self_attention", 0.0) + call["work"].get("overhead", 0.0)


def _layer_row(check: Check, transformer, inputs: dict, config: AccelerationConfig | None, row: dict) -> float:
    """Time the attention module of `transformer`'s one block at "layer_repeats" warm steps after a cold
    one past every preset's dense warm-up; fills `row`, returns the warm calls' attention FLOPs."""
    first = LAYER_STEPS // 2
    attention = transformer.blocks[0].attn1
    with (measure(transformer) if config is None else apply(transformer, config)) as handle:
        _wan_call(transformer, inputs, first, LAYER_STEPS)
        with _peak_memory(check.device) as memory, _module_times(attention, check.device) as times:
            for step in range(first + 1, first + 1 + check.sizes["layer_repeats"]):
                _wan_call(transformer, inputs, step, LAYER_STEPS)
        calls = [call for step in handle.report()["steps"][1:] for call in step["calls"]]
    row.update(ms=statistics.median(times), peak_mib=memory["peak_mib"])
    dense_layers = {reason for call in calls for reason in call.get("dense_layers", {})}
    if dense_layers:
        row["detail"] = f"ran dense: {', '.join(sorted(dense_layers))}"
    return sum(_attention_flops(call) for call in calls) / len(calls)


def _sdpa_alone(check: Check, heads: int, tokens: int, row: dict) -> None:
    query, key, value = (torch.randn(1, heads, tokens, 128, device=check.device, dtype=check.dtype) for _ in range(3))
    F.scaled_dot_product_attention(query, key, value)
    times = []
    with _peak_memory(check.device) as memory:
        for _ in range(check.sizes["layer_repeats"]):
            begin = _mark(check.device)
            F.scaled_dot_product_attention(query, key, value)
            end = _mark(check.device)
            _synchronize(check.device)
            times.append(_elapsed_ms(begin, end))
    row.update(ms=statistics.median(times), peak_mib=memory["peak_mib"])


def check_layer(check: Check) -> None:
    sizes = SMALL["layer"] if check.small else {}
    grid = sizes.get("grid", WAN_480P["grid"])
    text_tokens = sizes.get("text_tokens", WAN_480P["text_tokens"])
    for model in LAYER_MODELS:
        check.say(f"layer: {model}")
        _check_layer_of(check, model, grid, text_tokens, {**sizes.get("common", {}), **sizes.get(model, {})})


def _check_layer_of(check: Check, model: str, grid: tuple[int, int, int], text_tokens: int, overrides: dict) -> None:
    """One model's layer rows (what it built is freed on return)."""
    heads = overrides.get("num_attention_heads", RELEASES[model].config["num_attention_heads"])
    tokens = math.prod(grid)
    base = {"part": "layer", "model": model, "kernel": "-",
            "shape": f"{heads} x 128 heads, {'x'.join(map(str, grid))} = {tokens:,} tokens, {text_tokens} text"}
    built: dict[str, Any] = {}

    def build(row: dict[str, Any]) -> None:
        transformer = release_transformer(model, num_layers=1, device=check.device, dtype=check.dtype, **overrides)
        built.update(transformer=transformer, inputs=wan_inputs(transformer, grid, text_tokens))

    check.attempt({**base, "row": "(build)"}, build, keep_ok=False)
    if not built:
        return
    transformer, inputs = built["transformer"], built["inputs"]
    check.attempt({**base, "row": "dense SDPA alone"}, lambda row: _sdpa_alone(check, heads, tokens, row))
    dense = check.attempt({**base, "row": "dense"}, lambda row: row.update(
        attention_flops=_layer_row(check, transformer, inputs, None, row)))
    for label, config in layer_configs(check.small):
        kernels = () if check.small else kernel_values(type(config))
        for kernel in kernels or (None,):
            def run(row, config=config, kernel=kernel):
                row["attention_flops"] = _layer_row(check, transformer, inputs, _with_kernel(config, kernel), row)
                if dense.get("attention_flops"):
                    row["flops_ratio"] = row["attention_flops"] / dense["attention_flops"]
                if dense.get("ms"):
                    row["speedup"] = dense["ms"] / row["ms"]

            check.attempt({**base, "row": label, "kernel": kernel or "default"}, run)


# -- models: full-width transformers for a few steps -------------------------------------------------

def model_plans(steps: int) -> list[tuple[str, list]]:
    ras = RASConfig.for_steps(steps)
    return [("dense", []), ("ras", [ras]), ("svg2", [SVG2Config()]), ("proxy", [ProxyAttentionConfig()]),
            ("ras+fbcache:threshold=0.1", [ras, FirstBlockCacheConfig(threshold=0.1)])]


def check_models(check: Check) -> None:
    for model, (overrides, call) in check.sizes["models"].items():
        check.say(f"models: {model}")
        _check_model(check, model, overrides, call, check.sizes["models_steps"])


def _check_model(check: Check, model: str, overrides: dict, call: dict, steps: int) -> None:
    """One model's whole runs, dense first (what it built is freed on return)."""
    base = {"part": "models", "model": model}
    built: dict[str, Any] = {}

    def build(row: dict[str, Any]) -> None:
        transformer = release_transformer(model, device=check.device, dtype=check.dtype, **overrides)
        pipe = release_pipeline(model, transformer)
        kwargs = release_call_kwargs(model, transformer, num_inference_steps=steps,
                                     guidance_scale=MODEL_GUIDANCE[model], **call)
        pipe(**{**kwargs, "num_inference_steps": 1})  # warm-up, untimed
        built.update(pipe=pipe, kwargs=kwargs)

    check.attempt({**base, "plan": "(build and warm up)"}, build, keep_ok=False)
    if not built:
        return
    pipe, kwargs = built["pipe"], built["kwargs"]
    base["shape"] = _model_shape(model, pipe.transformer, kwargs)
    dense: dict[str, Any] = {}
    for label, configs in model_plans(steps):
        def run(row, configs=configs, label=label):
            handle = apply(pipe, *configs) if configs else measure(pipe)
            with handle, _peak_memory(check.device) as memory:
                _synchronize(check.device)
                start = time.perf_counter()
                output = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)})
                _synchronize(check.device)
                seconds = time.perf_counter() - start
                report = handle.report()
            latents = (output.frames if hasattr(output, "frames") else output.images).float().cpu()
            row.update(seconds=seconds, flops_ratio=report["flops_ratio"])
            if label == "dense":
                dense.update(seconds=seconds, latents=latents)
            elif dense:
                row.update(speedup=dense["seconds"] / seconds,
                           relative_difference=_relative_error(latents, dense["latents"]))
            row["peak_mib"] = memory["peak_mib"]

        check.attempt({**base, "plan": label}, run)


def _blocks(transformer) -> list:
    return list(getattr(transformer, "blocks", None) or transformer.transformer_blocks)


def _model_shape(model: str, transformer, kwargs: dict) -> str:
    config = transformer.config
    blocks = len(_blocks(transformer))
    if "num_frames" in kwargs:
        frames = (kwargs["num_frames"] - 1) // 4 + 1
        tokens = f"{frames}x{kwargs['height'] // 16}x{kwargs['width'] // 16}"
    else:
        tokens = f"{kwargs['height'] // 16}x{kwargs['width'] // 16}"
    batch = "CFG batched" if MODEL_GUIDANCE[model] > 1 else "one call a step"
    return (f"{blocks} blocks of {config.num_attention_heads} x {config.attention_head_dim}, {tokens} tokens "
            f"({kwargs['height']}x{kwargs['width']}), {kwargs['num_inference_steps']} steps, {batch}")


# -- the report ----------------------------------------------------------------------------------

def environment(device: torch.device, dtype: torch.dtype, small: bool) -> dict[str, Any]:
    """What the numbers belong to: the card, torch, CUDA, cuDNN, diffusers, dtype."""
    cuda = device.type == "cuda"
    return {"machine": machine(device), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "small": small, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def run_check(*, small: bool, device: str | None = None, parts: tuple[str, ...] = PARTS, time_limit: float = 450.0,
              say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """The check's report: its environment, settings, every row, the failures."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type != "cuda" and not small:
        raise UsageError(f"gpu-check at full shapes needs a CUDA device (got {target}); on a CPU run it with --small")
    dtype = torch.float32 if small else torch.bfloat16
    started = time.perf_counter()
    end = started + time_limit
    check = Check(target, dtype, small, end, say)
    runs = [run for part, run in (("families", check_families), ("layer", check_layer), ("models", check_models))
            if part in parts]
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # set_attention_backend warns on every call
    try:
        with torch.no_grad():
            for left, run in zip(range(len(runs), 0, -1), runs):
                now = time.perf_counter()
                check.deadline = now + max(end - now, 0.0) / left
                run(check)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    failures = [row for row in check.rows if row["status"] in FAILED]
    return {"environment": environment(target, dtype, small), "parts": list(parts), "time_limit_s": time_limit,
            "seconds": time.perf_counter() - started, "tolerance": TOLERANCE[dtype], "failures": len(failures),
            "rows": check.rows}


def _number(value: Any, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    """The report as self-explanatory markdown: the environment, then one table per part."""
    env = report["environment"]
    rows = report["rows"]
    card = env["machine"]["gpu"] or f"CPU: {env['machine']['name']}"
    lines = ["# dit-accel gpu-check", "",
             f"- device: {card} ({env['device']}); torch {env['torch']}, CUDA {env['cuda'] or '-'}, cuDNN "
             f"{env['cudnn'] or '-'}, diffusers {env['diffusers']}, Python {env['python']}",
             f"- dtype: {env['dtype']}; shapes: {'reduced (--small, see each part)' if env['small'] else 'full'}",
             f"- {len(rows)} rows in {report['seconds']:.0f} s (limit {report['time_limit_s']:.0f} s); "
             f"{report['failures']} failed (keep-all differs from dense, or a crash)", ""]
    by_part = {part: [row for row in rows if row["part"] == part] for part in PARTS}
    if "families" in report["parts"]:
        lines += _families_table(by_part["families"], report["tolerance"], env["small"])
    if "layer" in report["parts"]:
        lines += _layer_table(by_part["layer"], env)
    if "models" in report["parts"]:
        lines += _models_table(by_part["models"], env)
    failed = [row for row in rows if row["status"] in FAILED]
    if failed:
        lines += ["## Failures", ""] + [f"- {_row_name(row)}: {row['status']}: {_text(row.get('detail', ''))}"
                                        for row in failed]
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    """A table cell: one line, no column bar."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _peak(row: dict[str, Any], env: dict[str, Any]) -> str:
    return _number(row.get("peak_mib"), ",.0f") if env["device"].startswith("cuda") else "n/a"


def _row_name(row: dict[str, Any]) -> str:
    keys = ("family", "backend", "model", "plan", "row", "kernel")
    return " / ".join(str(row[key]) for key in keys if row.get(key) not in (None, "-", "default"))


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] in ("ok", "mismatch") and "error" in row:
        return f"{row['error']:.0e}" if row["status"] == "ok" else f"**{row['error']:.0e}**"
    return row["status"]


def _families_table(rows: list[dict[str, Any]], tolerance: float, small: bool) -> list[str]:
    lacking = [row for row in rows if row["check"] == "backend"]
    rows = [row for row in rows if row["check"] != "backend"]
    techniques = list(dict.fromkeys(row["plan"] for row in rows if row["check"] == "keep_all"))
    lines = ["## Tiny pipelines: keep-all equals dense, presets run, under each SDPA backend", "",
             "Each cell: relative L2 error of the output latents of `keep_all()` against the dense run under the "
             f"same backend (pass: <= {tolerance:.0e}; bold: over it), or what stopped it; with the kernel where it "
             "ran under several. Presets: how many ran to a finite output. Tiny random-weight pipelines (2 blocks "
             "at most, 128x128 images, 9 frames)"
             + (": --small runs sd3 and wan, presets under the default backend only." if small else "."), ""]
    lines += [f"Backend this device lacks: `{row['backend']}` ({_text(row['detail'])})" for row in lacking]
    lines += ["", "| family | backend | dense | " + " | ".join(f"`{t}`" for t in techniques) + " | presets run |",
              "|---|---|---|" + "---:|" * len(techniques) + "---:|"]
    for family, backend in dict.fromkeys((row["family"], row["backend"]) for row in rows):
        mine = [row for row in rows if (row["family"], row["backend"]) == (family, backend)]
        dense = next(row for row in mine if row["check"] == "dense")
        cells = []
        for technique in techniques:
            found = [row for row in mine if row["plan"] == technique]
            cells.append(", ".join(_cell(row) + (f" ({row['kernel']})" if len(found) > 1 else "") for row in found)
                         or "-")
        presets = [row for row in mine if row["check"] == "preset"]
        ran = f"{sum(row['status'] == 'ok' for row in presets)}/{len(presets)}" if presets else "-"
        status = dense["status"] if dense["status"] == "ok" else f"{dense['status']}: {_text(dense.get('detail', ''))}"
        lines.append(f"| {family} | {backend} | {status} | " + " | ".join(cells) + f" | {ran} |")
    return lines + [""]


def _layer_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    timer = "CUDA events" if env["device"].startswith("cuda") else "perf_counter"
    lines = ["## One attention layer at Wan 2.1 480p x 81 frames", "",
             f"One Wan block with random weights in {env['dtype']}; each row times its self-attention module "
             f"(projections, norms and RoPE included; median of {(SMALL if env['small'] else FULL)['layer_repeats']} "
             "warm calls at steps past the "
             f"presets' dense warm-up, {timer}) and the peak memory above the call's start "
             "(`max_memory_allocated`; n/a off CUDA). "
             "FLOPs ratio: the ledger's self-attention FLOPs with the technique's planning against dense. Random "
             "weights attend diffusely, so a preset may rightly run a layer dense (said in detail) and the density a "
             "sparse kernel keeps is higher than on a trained model; `plan_every_layer=True` rows time the sparse "
             "kernel anyway; `flexdit:preset=quality` pools the K/V of its first 2 blocks. Real shapes: "
             "1.3B 12 x 128 heads, 14B 40 x 128, 21 x 30 x 52 = 32,760 tokens, 512 text tokens"
             + ("; --small keeps head dim and the 30 x 52 frame grid, fewer heads and frames, the default kernel "
                "only." if env["small"] else "."), "",
             "| model | shape | row | kernel | status | attention ms | speedup vs dense | FLOPs ratio | peak MiB | "
             "detail |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['shape']} | {row['row']} | {row['kernel']} | {row['status']} | "
                     f"{_number(row.get('ms'), '.2f')} | {_number(row.get('speedup'), '.2f', 'x')} | "
                     f"{_number(row.get('flops_ratio'), '.3f')} | {_peak(row, env)} | {_text(row.get('detail', ''))} |")
    return lines + [""]


def _models_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    lines = ["## Random-weight transformers at full width, a whole run", "",
             "Each plan runs the release's pipeline (prompt embeddings given, latents out, no VAE) once, timed end to "
             "end after an untimed 1-step warm-up; FLOPs ratio from the ledger; relative difference of the latents vs "
             "dense (random weights: a measure of drift, not quality); peak memory above the run's start"
             + (". --small: 2 blocks, fewer heads and text width, smaller images and videos." if env["small"] else
                ". SD3.5-medium batches CFG into one call; Wan runs one call a step (no uncond call)."), "",
             "| model | shape | plan | status | seconds | speedup | FLOPs ratio | rel. difference | peak MiB | "
             "detail |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row.get('shape', '-')} | {row['plan']} | {row['status']} | "
                     f"{_number(row.get('seconds'), '.2f')} | {_number(row.get('speedup'), '.2f', 'x')} | "
                     f"{_number(row.get('flops_ratio'), '.3f')} | {_number(row.get('relative_difference'), '.2e')} | "
                     f"{_peak(row, env)} | {_text(row.get('detail', ''))} |")
    return lines + [""]


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """`gpu_check.json` and `gpu_check.md` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "gpu_check.json", out / "gpu_check.md"
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(report))
    return paths
