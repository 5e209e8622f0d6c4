"""`dit-accel generate` and the plan specs it shares with the UI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
from PIL import Image

from diffusers.hooks import FirstBlockCacheConfig

import dit_accel
from dit_accel import RASConfig, SVG2Config
from dit_accel.cli import DEFAULT_PLANS, main
from dit_accel.config import ConfigError
from dit_accel.plan_spec import parse_plan

SPARSE_SPEC = "ras:sample_ratio=0.5,warmup_steps=1,error_reset_steps=()"
RUN_KEYS = {"label", "configs", "seconds", "speedup", "flops_ratio", "dense_flops", "flops", "psnr_db", "ssim"}


def test_parse_plan_reads_fields_as_literals():
    assert parse_plan(SPARSE_SPEC) == [RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())]
    (config,) = parse_plan("ras:sample_ratio=1e-1,error_reset_steps=(3, 5),metric=l2norm")
    assert (config.sample_ratio, config.error_reset_steps, config.metric) == (0.1, (3, 5), "l2norm")
    assert parse_plan("ras") == [RASConfig()]


def test_parse_plan_joins_techniques_and_scales_schedules():
    ras, svg2 = parse_plan("ras:sample_ratio=0.5+svg2:top_p=0.8")
    assert ras == RASConfig(sample_ratio=0.5) and svg2 == SVG2Config(top_p=0.8)
    fbcache, ras = parse_plan("fbcache:threshold=0.08+ras")
    assert fbcache == FirstBlockCacheConfig(threshold=0.08) and ras == RASConfig()
    (magcache,) = parse_plan("magcache:threshold=0.1", num_steps=12)
    assert magcache.calibrate and magcache.num_inference_steps == 12  # ratios come from dit_accel.calibrate
    assert parse_plan("ras:sample_ratio=0.5", num_steps=10) == [RASConfig.for_steps(10, sample_ratio=0.5)]
    assert parse_plan("ras:warmup_steps=3", num_steps=10)[0].warmup_steps == 3


@pytest.mark.parametrize("spec, message", [
    # dit-accel's techniques first, then diffusers' caches (a new technique registers among the first)
    ("foo:x=1", "valid techniques: ras, flexdit, dydit, svg2, proxy, .*fbcache, taylorseer, magcache, pab"),
    ("ras:bogus=1", "valid fields: sample_ratio, final_sample_ratio, warmup_steps"),
    ("ras:sample_ratio", "expected field=value"),
    ("ras:sample_ratio=0.5,sample_ratio=0.3", "given twice"),
    ("ras:sample_ratio=2", "sample_ratio must be in"),
    ("ras:error_reset_steps=3", "error_reset_steps must be tuple of int"),
    ("ras:cache_kv='no'", "cache_kv must be True or False"),
    ("fbcache:threshold='high'", "FirstBlockCacheConfig.threshold must be a number"),
    ("ras+ras", "cannot be combined"),
    ("fbcache+taylorseer", "both occupy stage 1"),
    (" ", "empty acceleration plan"),
])
def test_parse_plan_rejects_bad_specs_clearly(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_plan(spec)


def test_plans_lists_every_member_with_its_fields(capsys):
    assert main(["plans"]) == 0
    out = capsys.readouterr().out
    assert "ras: RASConfig, stage 2, 5:" in out and "fbcache: FirstBlockCacheConfig, stage 1:" in out
    assert "sample_ratio (float, default 0.5, in (0, 1]): fraction of image tokens recomputed" in out
    assert "svg2: SVG2Config, stage 6:" in out and "dydit: DyDiTConfig, stage 4:" in out


def test_calibrate_writes_a_file_that_plans_read_and_other_models_refuse(tmp_path, capsys):
    path = tmp_path / "sd3.safetensors"
    assert main(["calibrate", "--model", "tiny:sd3", "--steps", "2", "--prompt", "a red circle", "--prompt",
                 "a blue square", "--buckets", "2", "--output", str(path), "--quiet"]) == 0
    assert path.is_file() and f"dydit:calibration={path}" in capsys.readouterr().out
    plan = f"dydit:calibration={path},width_ratio=0.5"
    assert main(["generate", "--model", "tiny:sd3", "--steps", "2", "--plan", plan, "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][1]["flops_ratio"] < 0.9
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny:flux", "--steps", "2", "--plan", plan, "--out", str(tmp_path), "--quiet"])
    assert "does not fit this transformer" in capsys.readouterr().err


def test_bad_spec_fails_before_loading_a_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny:sd3", "--accel", "ras:bogus=1"])
    assert exit_info.value.code == 2 and "valid fields" in capsys.readouterr().err


def test_generate_image_grid_and_summary(tmp_path, capsys):
    assert main(["generate", "--model", "tiny:sd3", "--steps", "4", "--accel", SPARSE_SPEC,
                 "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"] == {"grid": "grid.png", "runs": ["dense.png", "plan1.png"]}
    dense, plan = summary["runs"]
    assert set(dense) == set(plan) == RUN_KEYS
    assert dense["label"] == "dense" and dense["flops_ratio"] == 1.0 and dense["speedup"] == 1.0
    assert plan["label"] == SPARSE_SPEC and plan["configs"][0]["technique"] == "ras"
    assert plan["flops_ratio"] < 1 and plan["seconds"] > 0 and plan["speedup"] > 0
    assert plan["psnr_db"] > 10 and 0 < plan["ssim"] <= 1
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 2 * 256
    table = (tmp_path / "summary.md").read_text()
    assert table in capsys.readouterr().out and f"| {SPARSE_SPEC} |" in table


def test_generate_video_writes_gif(tmp_path):
    assert main(["generate", "--model", "tiny:wan", "--steps", "2", "--frames", "5", "--height", "64",
                 "--width", "64", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"]["grid"] == "grid.gif"
    assert [run["label"] for run in summary["runs"]] == ["dense", *DEFAULT_PLANS]
    with Image.open(tmp_path / "grid.gif") as gif:
        assert gif.n_frames == 5


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent"], "model '/nonexistent': no such local folder, and not a valid hub id"),
    (["--model", "tiny:sd3", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--model", "tiny:sd3", "--height", "tall"], "--height: expected an integer"),
    (["--model", "tiny:sd3", "--plan", "svg2+proxy"], "stage 6"),
    (["--model", "tiny:sd3", "--accel", "svg2:top_p=2"], "top_p must be in"),
])
def test_bad_input_is_refused_by_name_before_any_model_work(argv, message, capsys, monkeypatch):
    import dit_accel.cli as cli

    def no_model_work(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(cli, "compare", no_model_work)
    monkeypatch.setattr("dit_accel.testing.tiny_pipeline", no_model_work)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv, "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_a_plan_file_is_a_plan(tmp_path):
    plan = tmp_path / "fast.plan"
    plan.write_text("# RAS, then a step cache\nras:sample_ratio=0.5,warmup_steps=1,error_reset_steps=()\n"
                    "fbcache:threshold=0.1\n")
    assert main(["generate", "--model", "tiny:dit", "--steps", "3", "--plan", str(plan), "--out", str(tmp_path),
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"][1]["label"] == "ras:sample_ratio=0.5,warmup_steps=1,error_reset_steps=()+fbcache:threshold=0.1"
    assert [c["technique"] for c in summary["runs"][1]["configs"]] == ["ras", "fbcache"]


def test_compare_runs_dense_then_each_plan_on_one_seed():
    from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    call = tiny_call_kwargs("sd3", num_inference_steps=3)
    with pytest.raises(ValueError, match="pass no generator"):
        dit_accel.compare(pipe, [SPARSE_SPEC], **call)
    del call["generator"]
    runs = dit_accel.compare(pipe, [[SVG2Config.keep_all()], SPARSE_SPEC], seed=3, **call)
    dense, keep_all, sparse = runs
    assert (dense.label, dense.configs, dense.report, dense.psnr) == ("dense", [], None, None)
    assert keep_all.label == "svg2" and keep_all.psnr > 60 and keep_all.ssim > 0.999
    assert sparse.label == SPARSE_SPEC and sparse.flops_ratio < 1 and 10 < sparse.psnr < keep_all.psnr
    assert all(run.seconds > 0 and run.output.shape == dense.output.shape for run in runs)
    assert sparse.speedup == pytest.approx(dense.seconds / sparse.seconds)
