"""What a technique declares to the tools through its registration and class: the settings `tune`
tries (`search_space`), the per-call stats `report()` carries and the UI lists and draws (`stats`),
its calibration (`calibrate`) and whether a user writes it in a plan (`plan_member`). A technique
registered outside dit-accel reaches tuning and the UI with no change to either."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers.hooks import MagCacheConfig

import dit_accel
from dit_accel.config import AccelerationConfig, ConfigError, Stage, param
from dit_accel.runtime import registry
from dit_accel.runtime.registry import plan_members, register_technique, registration, registrations
from dit_accel.runtime.search_space import SearchContext, Setting
from dit_accel.runtime.stats import Stat, StatKind
from dit_accel.runtime.technique import Technique
from dit_accel.techniques import ModelCheckConfig
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline
from dit_accel.tuning import singles
from dit_accel.ui.report_view import pictures, skipped

#: what `tune` tries at 6 steps: (label, knob, made by a calibration, the bolder settings after it)
SINGLES_AT_6_STEPS = [
    ("ras:sample_ratio=0.75", "ras", False, []),
    ("ras:sample_ratio=0.5", "ras", False, []),
    ("ras:sample_ratio=0.25", "ras", False, ["ras:sample_ratio=0.15", "ras:sample_ratio=0.09", "ras:sample_ratio=0.054"]),
    ("flexdit:preset=quality", None, False, []),
    ("flexdit:preset=balanced", None, False, []),
    ("flexdit:preset=fast", None, False, []),
    ("dydit:preset=quality", None, False, []),
    ("dydit:preset=balanced", None, False, []),
    ("dydit:preset=fast", None, False, []),
    ("dydit:preset=fast,calibrated", None, True, []),
    ("svg2:preset=quality", None, False, []),
    ("svg2:preset=balanced", None, False, []),
    ("svg2:preset=fast", None, False, []),
    ("proxy:preset=quality", None, False, []),
    ("proxy:preset=balanced", None, False, []),
    ("proxy:preset=fast", None, False, []),
    ("fbcache:threshold=0.05", "fbcache", False, []),
    ("fbcache:threshold=0.08", "fbcache", False, []),
    ("fbcache:threshold=0.12", "fbcache", False, []),
    ("fbcache:threshold=0.2", "fbcache", False, []),
    ("fbcache:threshold=0.3", "fbcache", False, ["fbcache:threshold=0.45", "fbcache:threshold=0.675",
                                                 "fbcache:threshold=1.01", "fbcache:threshold=1.52",
                                                 "fbcache:threshold=2.28"]),
    ("taylorseer:cache_interval=2", "taylorseer", False, []),
    ("taylorseer:cache_interval=3", "taylorseer", False, []),
    *[(f"magcache:threshold={t},max_skip_steps=2", "magcache, 2 skips", True, []) for t in ("0.03", "0.06", "0.1",
                                                                                            "0.15")],
    ("magcache:threshold=0.25,max_skip_steps=2", "magcache, 2 skips", True,
     [f"magcache:threshold={t},max_skip_steps=2" for t in ("0.4", "0.64", "1.02", "1.64", "2.62")]),
    ("magcache:threshold=0.15,max_skip_steps=4", "magcache, 4 skips", True, []),
    ("magcache:threshold=0.25,max_skip_steps=4", "magcache, 4 skips", True,
     [f"magcache:threshold={t},max_skip_steps=4" for t in ("0.4", "0.64", "1.02", "1.64", "2.62")]),
    ("magcache:threshold=0.25,max_skip_steps=6", "magcache, 6 skips", True,
     [f"magcache:threshold={t},max_skip_steps=6" for t in ("0.4", "0.64", "1.02", "1.64", "2.62")]),
    ("pab:spatial_attention_block_skip_range=2", None, False, []),
]
#: what every report call holds besides the techniques' stats
CALL_KEYS = {"branch", "num_steps", "timestep", "sigma", "dense_flops", "flops", "seconds", "work"}


def _chain(candidate) -> list[str]:
    labels, step = [], candidate.bolder
    while step is not None:
        candidate = step()
        if candidate is None:
            break
        labels.append(candidate.label)
        step = candidate.bolder
    return labels


def test_tune_tries_what_the_registrations_declare():
    calibrations = []

    def calibrate(config, what, path=None):
        calibrations.append((type(config).__name__, path))
        if isinstance(config, MagCacheConfig):
            return dataclasses.replace(config, calibrate=False, mag_ratios=[1.0] * 6, num_inference_steps=6)
        return config

    known = {label.split(":")[0] for label, *_ in SINGLES_AT_6_STEPS}
    found = [c for c in singles(SearchContext(6, calibrate, Path("/scratch"))) if c.label.split(":")[0] in known]
    assert [(c.label, c.knob, c.prepare is not None, _chain(c)) for c in found] == SINGLES_AT_6_STEPS
    assert all(c.members == (c,) for c in found)
    taylorseer = next(c for c in found if c.label == "taylorseer:cache_interval=2").configs[0]
    assert taylorseer.disable_cache_before_step == dit_accel.RASConfig.for_steps(6).warmup_steps
    dydit = next(c for c in found if c.label == "dydit:preset=fast,calibrated").prepare()
    assert dydit == [dit_accel.DyDiTConfig.preset("fast")]
    for candidate in found:
        if candidate.label.startswith("magcache"):
            candidate.prepare()  # one calibration serves every MagCache setting
    assert calibrations == [("DyDiTConfig", str(Path("/scratch") / "dydit.safetensors")), ("MagCacheConfig", None)]


def test_only_magcache_and_dydit_calibrate_and_the_model_check_is_no_plan_member():
    assert {r.name for r in registrations() if r.calibrate is not None} == {"dydit", "magcache"}
    assert registration(ModelCheckConfig()).plan_member is False
    assert ModelCheckConfig not in {r.config_class for r in plan_members()}
    with pytest.raises(ConfigError, match="needs no calibration .*DyDiTConfig or a MagCacheConfig"):
        dit_accel.calibrate(None, dit_accel.RASConfig())
    with pytest.raises(ConfigError, match="name the safetensors file"):
        dit_accel.calibrate(None, dit_accel.DyDiTConfig())
    assert registration(MagCacheConfig(calibrate=True)).calibrate is not None


PLANS = {
    "ras": [dit_accel.RASConfig(warmup_steps=1, error_reset_steps=())],
    "flexdit": [dit_accel.FlexDiTConfig(pooled_kv_blocks=1)],
    "dydit": [dit_accel.DyDiTConfig(width_ratio=0.5, token_ratio=0.5)],
    "svg2": [dit_accel.SVG2Config(query_clusters=4, key_clusters=8, dense_warmup=0.0, dense_first_blocks=0.0,
                                  plan_every_layer=True)],
    "proxy": [dit_accel.ProxyAttentionConfig(local_window=(1, 2, 2), proxy_window=(1, 1, 2), dense_warmup=0.0,
                                             dense_first_blocks=0.0)],
}


def test_every_stat_a_technique_reports_is_declared_on_its_class():
    pipe = tiny_pipeline("sd3")
    seen: set[str] = set()
    every: set[str] = set()
    for name, plan in PLANS.items():
        declared = {stat.key for config in plan for stat in registration(config).technique.stats}
        every |= declared
        with dit_accel.apply(pipe, *plan, details=True) as handle:  # the pictures too
            pipe(**tiny_call_kwargs("sd3"))
            report = handle.report()
        calls = [call for step in report["steps"] for call in step["calls"]]
        keys = {key for call in calls for key in call} - CALL_KEYS
        assert keys <= declared, (name, keys - declared)
        seen |= keys
    assert seen == every  # and each declared key is reported


@dataclass(frozen=True)
class _ToyConfig(AccelerationConfig):
    """A technique from outside dit-accel: occupies no stage, reports a value and a per-block fraction."""

    level: float = param(0.5, "how bold", low=0.0, high=1.0)
    name = "toy"

    def stages(self) -> frozenset[Stage]:
        return frozenset()

    @classmethod
    def keep_all(cls) -> "_ToyConfig":
        return cls(level=1.0)


def _toy_space(context: SearchContext) -> list[Setting]:
    def toy(level: float) -> Setting:
        return Setting(f"toy:level={level:g}", (_ToyConfig(level=level),), knob="toy",
                       bolder=lambda: toy(level / 2) if level > 0.2 else None)

    return [toy(0.8), toy(0.4)]


class _Toy(Technique):
    stats = (Stat("toy_level", StatKind.VALUE),
             Stat("toy_by_block", StatKind.BLOCK_FRACTION, "toy fraction"))

    def call_stats(self, call_state):
        return {"toy_level": self.config.level, "toy_by_block": {0: self.config.level, 1: 1.0}}


def test_a_new_technique_reaches_tuning_and_the_ui_through_its_registration_alone(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_technique(_ToyConfig, "a toy", search_space=_toy_space)(_Toy)
    found = singles(SearchContext(6, lambda *args, **kwargs: None, Path("/scratch")))
    toys = [c for c in found if c.knob == "toy"]
    assert [c.label for c in toys] == ["toy:level=0.8", "toy:level=0.4"]
    assert toys[0].bolder is None and toys[1].bolder().label == "toy:level=0.2"
    pipe = tiny_pipeline("sd3")
    with dit_accel.apply(pipe, _ToyConfig(level=0.25)) as handle:
        pipe(**tiny_call_kwargs("sd3"))
        report = handle.report()
    rows = skipped(report)
    assert rows and all(row["toy_level"] == 0.25 and "toy_by_block" not in row for row in rows)
    drawn = pictures(report, torch.rand(1, 3, 32, 32))
    assert [caption for _, caption in drawn] == [
        "toy fraction per step (rows, alike steps merged) and block (columns); 1 = dense"]
