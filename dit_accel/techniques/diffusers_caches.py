"""diffusers' own step caches as plan members (stage 1), applied and removed through diffusers' hooks.

`dit_accel.apply(pipe, RASConfig(...), FirstBlockCacheConfig(threshold=0.08))` puts diffusers'
FirstBlockCache hooks on the transformer exactly as `enable_cache` would (also on SD3, PixArt and
DiT, which have no `enable_cache`), and the handle takes them off again. What a cache needs from the
pipeline the runtime supplies: PAB's and FasterCache's `current_timestep_callback` from the step
context, a cache context for pipelines that open none (the session), the reset of the caches'
state at every run start, MagCache's `mag_ratios` from `dit_accel.calibrate` (diffusers' calibration
mode, run by `calibrate_magcache`). dit-accel writes no step cache of its own. Each cache's
registration also carries what `tune` tries of it (FirstBlockCache, TaylorSeer, MagCache and PAB).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import diffusers.hooks as diffusers_hooks
import torch
from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig, mag_cache, taylorseer_cache

from ..config import ConfigError, Stage, check_dataclass_fields
from ..runtime.hooks import remove_named_hooks
from ..runtime.call_state import CallState
from ..runtime.registry import Calibrate, SearchSpace, register_config
from ..runtime.search_space import SearchContext, Setting
from ..runtime.technique import Technique
from .ras import RASConfig

#: (threshold, max_skip_steps) of the MagCache settings `tune` tries
MAGCACHE_SETTINGS = ((0.03, 2), (0.06, 2), (0.1, 2), (0.15, 2), (0.25, 2), (0.15, 4), (0.25, 4), (0.25, 6))


@dataclass(frozen=True)
class CacheSpec:
    """One diffusers cache: its config class, plan name, `apply_*` function and hook names."""

    config_class: type
    name: str
    apply: Callable[[Any, Any], None]
    hook_names: tuple[str, ...]
    summary: str
    #: skips one half of a batched-CFG batch inside the call, so the blocks see another batch
    splits_batch: bool = False
    #: what `tune` tries of it (None: nothing)
    search_space: SearchSpace | None = None
    #: how `dit_accel.calibrate` completes its config (None: it needs no calibration)
    calibrate: Calibrate | None = None


def _cache_spec(config: str, module: str, name: str, hooks: tuple[str, ...], summary: str, **options: Any
                ) -> CacheSpec:
    """The spec of the cache whose config, `apply_<module>` and hook-name constants diffusers.hooks has."""
    hook_module = getattr(diffusers_hooks, module)
    return CacheSpec(getattr(diffusers_hooks, config), name, getattr(diffusers_hooks, "apply_" + module),
                     tuple(getattr(hook_module, hook) for hook in hooks), summary, **options)


# -- what `tune` tries, and MagCache's calibration ---------------------------------------------------
def _fbcache_settings(context: SearchContext) -> list[Setting]:
    def fbcache(threshold: float) -> Setting:
        config = diffusers_hooks.FirstBlockCacheConfig(threshold=threshold)
        return Setting(f"fbcache:threshold={threshold:.3g}", (config,), knob="fbcache",
                       bolder=lambda: fbcache(threshold * 1.5) if threshold < 2 else None)

    return [fbcache(t) for t in (0.05, 0.08, 0.12, 0.2, 0.3)]


def _taylorseer_settings(context: SearchContext) -> list[Setting]:
    """First-order forecasts after RAS's (the paper's) dense warm-up, every 2 or 3 steps, then bolder."""
    warmup = RASConfig.for_steps(context.steps).warmup_steps

    def taylorseer(interval: int) -> Setting:
        config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=1,
                                       taylor_factors_dtype=torch.float32)
        return Setting(f"taylorseer:cache_interval={interval}", (config,), knob="taylorseer",
                       bolder=lambda: taylorseer(interval + 1) if interval < context.steps // 2 else None)

    return [taylorseer(n) for n in (2, 3)]


def _magcache_settings(context: SearchContext) -> list[Setting]:
    """`MAGCACHE_SETTINGS`, each threshold going bolder per number of skips; one calibration run (on
    the first batch, when the first of them runs) serves them all."""
    ratios: list = []

    def prepare(threshold: float, skips: int) -> Callable[[SearchContext], list]:
        def make(context: SearchContext) -> list:
            if not ratios:
                probe = MagCacheConfig(threshold=threshold, calibrate=True)
                ratios.append(context.calibrate(probe, "MagCache's per-step ratios").mag_ratios)
            return [MagCacheConfig(threshold=threshold, max_skip_steps=skips, mag_ratios=ratios[0],
                                   num_inference_steps=context.steps)]
        return make

    def magcache(threshold: float, skips: int) -> Setting:
        return Setting(f"magcache:threshold={threshold:.3g},max_skip_steps={skips}", prepare=prepare(threshold, skips),
                       knob=f"magcache, {skips} skips",
                       bolder=lambda: magcache(threshold * 1.6, skips) if threshold < 2 else None)

    return [magcache(t, n) for t, n in MAGCACHE_SETTINGS]


def _pab_settings(context: SearchContext) -> list[Setting]:
    return [Setting("pab:spatial_attention_block_skip_range=2",
                    (diffusers_hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),))]


def calibrate_magcache(pipe: Any, config: MagCacheConfig, *, apply: Callable[..., Any], path: str | None = None,
                       call_kwargs: dict[str, Any]) -> MagCacheConfig:
    """`config` with its per-step magnitude ratios from diffusers' own calibration mode, over one run of
    `pipe(**call_kwargs)` (for the run's steps); `path` is not used (the ratios live in the config)."""
    steps = call_kwargs.get("num_inference_steps")
    if steps is None:
        steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    probe = dataclasses.replace(config, calibrate=True, num_inference_steps=steps)
    with logged_mag_ratios() as ratios, apply(pipe, probe):
        pipe(**call_kwargs)
    if not ratios:
        raise RuntimeError(f"MagCache calibration over {steps} steps reported no ratios")
    return dataclasses.replace(config, calibrate=False, mag_ratios=ratios[0], num_inference_steps=steps)


CACHES: list[CacheSpec] = [
    _cache_spec("FirstBlockCacheConfig", "first_block_cache", "fbcache", ("_FBC_LEADER_BLOCK_HOOK", "_FBC_BLOCK_HOOK"),
                "FirstBlockCache: skip the blocks after the first when its residual barely changed",
                search_space=_fbcache_settings),
    _cache_spec("TaylorSeerCacheConfig", "taylorseer_cache", "taylorseer", ("_TAYLORSEER_CACHE_HOOK",),
                "TaylorSeer: forecast attention outputs between full steps with a Taylor series",
                search_space=_taylorseer_settings),
    _cache_spec("MagCacheConfig", "mag_cache", "magcache", ("_MAG_CACHE_LEADER_BLOCK_HOOK", "_MAG_CACHE_BLOCK_HOOK"),
                "MagCache: skip steps while the calibrated residual magnitude ratio stays near 1",
                search_space=_magcache_settings, calibrate=calibrate_magcache),
    _cache_spec("PyramidAttentionBroadcastConfig", "pyramid_attention_broadcast", "pab",
                ("_PYRAMID_ATTENTION_BROADCAST_HOOK",),
                "Pyramid Attention Broadcast: reuse attention outputs for a range of steps",
                search_space=_pab_settings),
    _cache_spec("FasterCacheConfig", "faster_cache", "fastercache",
                ("_FASTER_CACHE_DENOISER_HOOK", "_FASTER_CACHE_BLOCK_HOOK"),
                "FasterCache: reuse attention outputs and the unconditional branch", splits_batch=True),
    _cache_spec("SeaCacheConfig", "sea_cache", "seacache",
                ("_SEA_CACHE_ROOT_HOOK", "_SEA_CACHE_LEADER_BLOCK_HOOK", "_SEA_CACHE_BLOCK_HOOK",
                 "_SEA_CACHE_POST_NORM_HOOK"),
                "SeaCache: skip the block stack while spectral-evolution indicators barely change"),
    _cache_spec("TextKVCacheConfig", "text_kv_cache", "textkv",
                ("_TEXT_KV_CACHE_TRANSFORMER_HOOK", "_TEXT_KV_CACHE_BLOCK_HOOK"),
                "TextKVCache: compute the text tokens' keys and values once per run"),
]
ALL_CACHE_HOOK_NAMES = frozenset(name for spec in CACHES for name in spec.hook_names)
_SPECS = {spec.config_class: spec for spec in CACHES}


def _step_skip(config: Any) -> frozenset[Stage]:
    return frozenset({Stage.STEP_SKIP})


class DiffusersCache(Technique):
    """A diffusers cache config applied with diffusers' own `apply_*` function."""

    def __init__(self, config: Any, session):
        super().__init__(config, session)
        check_dataclass_fields(config)
        self.spec = _SPECS[type(config)]
        #: the config as applied: what the runtime supplied filled in
        self.applied = config

    def attach(self) -> None:
        transformer = self.session.transformer
        present = sorted({name for module in transformer.modules() if hasattr(module, "_diffusers_hook")
                          for name in module._diffusers_hook.hooks if name in ALL_CACHE_HOOK_NAMES})
        if present:
            raise ConfigError(f"{type(transformer).__name__} already has a diffusers cache ({', '.join(present)}, e.g. "
                              f"from enable_cache); a plan takes one step cache: call `disable_cache()` first or "
                              f"leave {self.label} out of the plan")
        self.applied = self._completed(self.config)
        self.spec.apply(transformer, self.applied)

    def check_plan(self) -> None:
        token_set = self.session.by_stage.get(Stage.TOKEN_SET)
        if self.spec.splits_batch and token_set is not None:
            raise ConfigError(f"{self.label} runs only part of the batch on some steps, so it cannot be combined "
                              f"with {token_set.label} (stage 2), whose token selection is per sample")

    def detach(self) -> None:
        remove_named_hooks(self.session.transformer, self.spec.hook_names)

    def _completed(self, config: Any) -> Any:
        """The config with what it needs from the pipeline filled in."""
        changes: dict[str, Any] = {}
        if getattr(config, "current_timestep_callback", False) is None:
            changes["current_timestep_callback"] = self._current_timestep
        identifiers = getattr(config, "_unconditional_conditional_input_kwargs_identifiers", None)
        if identifiers is not None and "pooled_projections" not in identifiers:
            # FasterCache drops the unconditional half of every input it names; SD3's and Flux's pooled text
            # embeddings carry that half too (diffusers' defaults miss them: a batch-size mismatch)
            changes["_unconditional_conditional_input_kwargs_identifiers"] = [*identifiers, "pooled_projections"]
        if isinstance(config, TaylorSeerCacheConfig) and not (config.cache_identifiers or config.skip_predict_identifiers
                                                              or config.use_lite_mode):
            changes.update(self._taylorseer_identifiers())
        return dataclasses.replace(config, **changes) if changes else config

    def _current_timestep(self) -> float | None:
        call_state = self.session.call_state
        return None if call_state is None else call_state.ctx.timestep

    def _taylorseer_identifiers(self) -> dict[str, Any]:
        """diffusers' default patterns end in `attn`, so they miss `attn1` (Wan, CogVideoX) and hook nothing
        there; then name this model's self-attentions instead."""
        transformer = self.session.transformer
        names = {id(module): name for name, module in transformer.named_modules()}
        defaults = taylorseer_cache._TRANSFORMER_BLOCK_IDENTIFIERS
        if any(re.fullmatch(pattern, name) for name in names.values() for pattern in defaults):
            return {}
        adapter = self.session.adapter
        attentions = [names[id(a)] for block in adapter.blocks() for a in adapter.self_attentions(block)]
        return {"cache_identifiers": [re.escape(name) for name in attentions]}

    def begin_call(self, call_state: CallState) -> None:
        if self.spec.splits_batch and not call_state.ctx.cfg_batched:
            raise ConfigError(f"{self.label} drops the unconditional half of a call that batches CFG, and this call "
                              f"has none (branch {call_state.ctx.branch!r}: guidance off, or CFG in separate calls as "
                              "Wan's pipelines run it); use it with batched CFG or leave it out of the plan")
        steps = call_state.ctx.num_steps
        if isinstance(self.applied, MagCacheConfig) and steps is not None and call_state.ctx.step_index == 0 \
                and steps != self.applied.num_inference_steps:
            raise ConfigError(f"MagCacheConfig.num_inference_steps is {self.applied.num_inference_steps} but this run "
                              f"has {steps} steps: its magnitude ratios are per step; pass num_inference_steps={steps}")


@contextlib.contextmanager
def logged_mag_ratios() -> Iterator[list[list[float]]]:
    """The ratios MagCache's calibration mode reports at the end of each run (one list per cache context),
    collected from its log instead of printed."""
    ratios: list[list[float]] = []
    prefix = "MagCache Calibration Results: "

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(prefix):
                ratios.append([float(r) for r in ast.literal_eval(message[len(prefix):])])

    logger = logging.getLogger(mag_cache.__name__)
    handler, level, propagate = Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield ratios
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _register(caches: list[CacheSpec]) -> None:
    for cache in caches:
        register_config(cache.config_class, name=cache.name, stages=_step_skip, summary=cache.summary,
                        technique=DiffusersCache, search_space=cache.search_space, calibrate=cache.calibrate)


_register(CACHES)
