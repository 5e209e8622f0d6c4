"""Stage 0, the schedule: fewer steps and a step mask as plan members. Fewer steps through the plan is
exactly the pipeline run with fewer steps, on every family's scheduler; both stack with the other
stages and count, in the report, the work of the steps the call asked for."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from helpers import run

import dit_accel
from dit_accel import RASConfig, StepMaskConfig, StepsConfig
from dit_accel.config import ConfigError
from dit_accel.plan_files import load_plan, save_plan
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import FAMILIES, tiny_pipeline

STEPS = 8


@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_steps_is_the_pipeline_with_fewer_steps(family):
    """Every family's scheduler (flow matching with and without written-out sigmas, DPM-Solver, DDIM, UniPC)
    sets up the fewer steps exactly as the pipeline itself would."""
    pipe = tiny_pipeline(family)
    fewer = run(pipe, family, num_inference_steps=3)
    with dit_accel.apply(pipe, StepsConfig(count=3)) as handle:
        out = run(pipe, family, num_inference_steps=STEPS)
        report = handle.report()
    torch.testing.assert_close(out, fewer, rtol=1e-5, atol=1e-5)
    assert report["num_steps"] == 3 and report["requested_steps"] == STEPS
    assert report["flops_ratio"] == pytest.approx(3 / STEPS, rel=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_keep_all_runs_every_step_through_the_rewrite(family):
    pipe = tiny_pipeline(family)
    dense = run(pipe, family, num_inference_steps=STEPS)
    with dit_accel.apply(pipe, StepsConfig.keep_all()) as handle:
        torch.testing.assert_close(run(pipe, family, num_inference_steps=STEPS), dense, rtol=1e-5, atol=1e-5)
        assert handle.report()["flops_ratio"] == pytest.approx(1.0)


def test_ratio_rounds_and_keeps_a_step():
    assert StepsConfig(ratio=0.5).steps_run(20) == 10 and StepsConfig(ratio=0.01).steps_run(20) == 1
    assert StepsConfig(count=7).steps_run(20) == 7
    with pytest.raises(ConfigError, match="ratio"):
        StepsConfig(ratio=0.0)


def test_a_plan_string_scales_the_other_schedules_to_the_steps_that_run():
    steps, ras = parse_plan("steps:count=10+ras:sample_ratio=0.5", num_steps=20)
    assert steps == StepsConfig(count=10) and ras == RASConfig.for_steps(10, sample_ratio=0.5)
    (magcache, _) = parse_plan("magcache:threshold=0.1+steps:ratio=0.5", num_steps=20)
    assert magcache.num_inference_steps == 10


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_fewer_steps_stacks_with_ras_and_a_step_cache(family):
    pipe = tiny_pipeline(family)
    with dit_accel.apply(pipe, *parse_plan("steps:count=6+ras:sample_ratio=0.5", num_steps=STEPS)) as handle:
        out = run(pipe, family, num_inference_steps=STEPS)
        with_ras = handle.report()
    assert torch.isfinite(out).all() and with_ras["num_steps"] == 6
    assert with_ras["flops_ratio"] < 6 / STEPS - 0.05  # RAS saves on the steps that run
    with dit_accel.apply(pipe, StepsConfig(count=6), FirstBlockCacheConfig(threshold=0.5)) as handle:
        run(pipe, family, num_inference_steps=STEPS)
        assert handle.report()["flops_ratio"] < 6 / STEPS


def test_a_plan_file_round_trips_and_checks_the_call_s_own_steps(tmp_path):
    pipe = tiny_pipeline("sd3")
    path = tmp_path / "plan.json"
    save_plan(path, [StepsConfig(count=5)], pipe, num_inference_steps=STEPS)
    configs = load_plan(str(path))
    assert StepsConfig(count=5) in configs
    with dit_accel.apply(pipe, *configs) as handle:
        run(pipe, "sd3", num_inference_steps=STEPS)  # tuned for the call's 8 steps, though 5 run
        assert handle.report()["num_steps"] == 5
        with pytest.raises(ConfigError, match="tuned for 8 steps"):
            run(pipe, "sd3", num_inference_steps=6)


def test_fewer_steps_needs_a_pipeline():
    pipe = tiny_pipeline("sd3")
    with pytest.raises(ConfigError, match="apply it to a pipeline"):
        dit_accel.apply(pipe.transformer, StepsConfig(count=3))


@pytest.mark.parametrize("family", ["sd3", "wan", "cogvideox"])
def test_step_mask_keep_all_equals_dense_and_a_mask_reuses_outputs(family):
    """Keep-all computes every step through the mask's hooks; `every=2` computes the first steps, every
    second one and the last, and a masked call records no work (its dense work counts as skipped)."""
    pipe = tiny_pipeline(family)
    dense = run(pipe, family, num_inference_steps=STEPS)
    with dit_accel.apply(pipe, StepMaskConfig.keep_all()):
        torch.testing.assert_close(run(pipe, family, num_inference_steps=STEPS), dense, rtol=1e-5, atol=1e-5)
    with dit_accel.apply(pipe, StepMaskConfig(every=2, first=2, last=1)) as handle:
        out = run(pipe, family, num_inference_steps=STEPS)
        report = handle.report()
    computed = [s["step"] for s in report["steps"] if all(c["step_computed"] for c in s["calls"])]
    assert computed == [0, 1, 2, 4, 6, 7]
    assert all(c["flops"] == 0 for s in report["steps"] if s["step"] not in computed for c in s["calls"])
    assert report["flops_ratio"] == pytest.approx(len(computed) / STEPS, rel=1e-6)
    assert torch.isfinite(out).all() and not torch.equal(out, dense)


def test_step_mask_stacks_with_ras():
    """RAS acts only on the computed steps (the masked ones reuse the last output before RAS runs)."""
    pipe = tiny_pipeline("sd3")
    plan = [StepMaskConfig(every=2, first=2, last=1), RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())]
    with dit_accel.apply(pipe, *plan) as handle:
        out = run(pipe, "sd3", num_inference_steps=STEPS)
        report = handle.report()
    assert torch.isfinite(out).all()
    masked = [c for s in report["steps"] for c in s["calls"] if not c["step_computed"]]
    assert masked and all("image_tokens" not in c for c in masked)  # RAS did not see them
    assert report["flops_ratio"] < 6 / STEPS


def test_one_schedule_member_per_plan():
    with pytest.raises(ConfigError, match="stage 0"):
        parse_plan("steps:count=4+stepmask")
