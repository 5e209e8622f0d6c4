"""`dit-accel bench`: the command end to end on a tiny model, its metrics against known values, and
its Pareto front."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import importlib.util
import json
import math

import pytest
import torch
from PIL import Image

from dit_accel.benchmarks import bench
from dit_accel.cli import main
from dit_accel.loading import UsageError
from dit_accel.metrics import judge as judges
from dit_accel.metrics import procedural

RAS = "ras:sample_ratio=0.5"
# FirstBlockCache skips nothing on the tiny SD3 at 2 steps or at small thresholds: 4 steps and 0.5 make it skip
FBCACHE = "fbcache:threshold=0.5"


def test_bench_end_to_end_on_a_tiny_model(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red circle on the left", "a blue square at the top"]))
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny:sd3", "--steps", "4", "--plan", RAS, "--plan", FBCACHE,
                 "--peers", "fbcache", "fastercache", "dbcache", "--prompts", str(prompts), "--batch", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "results.md", "pareto_psnr.png"}
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny:sd3" and results["threads"] == torch.get_num_threads()
    assert results["torch"] == torch.__version__ and results["dtype"] == "float32"
    assert results["call"]["num_inference_steps"] == 4 and results["call"]["batch"] == 2
    assert results["prompts"]["count"] == 2 and results["machine"]["name"]
    rows = {row["label"]: row for row in results["rows"]}
    assert list(rows)[:4] == ["dense", "dense (no hooks)", RAS, FBCACHE]

    dense, bare = rows["dense"], rows["dense (no hooks)"]
    assert dense["psnr_db"] is None and dense["identical_to_dense"] and dense["flops_ratio"] == 1.0
    assert dense["speedup"] == 1.0 and dense["transformer_seconds_per_sample"] > 0 and dense["samples"] == 2
    # no handle: no ledger, and on a CPU the same output bit for bit
    assert bare["flops_ratio"] is None and bare["transformer_seconds_per_sample"] is None
    assert bare["identical_to_dense"] and bare["speedup"] > 0
    for label in (RAS, FBCACHE, "FirstBlockCache 0.12"):
        row = rows[label]
        assert row["status"] == "ok" and row["seconds_per_sample"] > 0 and row["peak_memory_mib"] is not None
        assert row["speedup"] == pytest.approx(dense["seconds"] / row["seconds"])
        assert 0 < row["ssim"] <= 1
    for label in (RAS, FBCACHE):
        assert 0 < rows[label]["flops_ratio"] < 1 and math.isfinite(rows[label]["psnr_db"]) and \
            rows[label]["psnr_db"] > 10
    # a peer this diffusers cannot run here is a row with its error, not a crash
    faster = rows["FasterCache"]
    assert faster["status"] in ("ok", "failed") and (faster["status"] == "ok") == (faster["error"] is None)

    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith(f"# dit-accel bench on {results['machine']['name']}: tiny:sd3")
    assert f"| {RAS} |" in table and "| dense (no hooks) |" in table and table in capsys.readouterr().out
    if faster["status"] == "failed":
        assert f"FasterCache failed: {faster['error']}" in table
    # cache-dit's DBCache when it is installed (timed without a handle: no ledger), else a note saying so
    dbcache = [row for label, row in rows.items() if "DBCache" in label]
    if importlib.util.find_spec("cache_dit") is None:
        assert not dbcache and "cache-dit is not installed" in table
    else:
        assert dbcache[0]["status"] == "ok" and dbcache[0]["flops_ratio"] is None and dbcache[0]["seconds"] > 0
        assert dbcache[0]["identical_to_dense"] or dbcache[0]["psnr_db"] > 10
    with open(out / "results.csv", newline="") as handle:
        assert [line["label"] for line in csv.DictReader(handle)] == list(rows)
    with Image.open(out / "pareto_psnr.png") as picture:
        assert picture.width > 400 and picture.height > 300


def test_bad_input_is_refused_before_a_model_loads(tmp_path, capsys, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("dit_accel.testing.tiny_pipeline", no_model_work)
    for argv, message in ((["--plan", "ras:bogus=1"], "valid fields"),
                          (["--prompts", str(tmp_path / "missing.txt")], "no such file"),
                          (["--steps", "0"], "must be >= 1"), (["--batch", "0"], "must be >= 1"),
                          (["--peers", "nope"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--model", "tiny:sd3", "--out", str(tmp_path), "--quiet", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0 and "--peers" in capsys.readouterr().out


def test_prompt_files_are_lines_or_a_json_list(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("# comment\na red fox\n\n  a blue bird  \n")
    assert bench.read_prompts(lines) == ["a red fox", "a blue bird"]
    listed = tmp_path / "prompts.json"
    listed.write_text('["one", "two, three"]')
    assert bench.read_prompts(listed) == ["one", "two, three"]
    for text in ("[1, 2]", "[broken", ""):
        listed.write_text(text)
        with pytest.raises(UsageError):
            bench.read_prompts(listed)
    assert len(bench.read_prompts(bench.PROMPTS_DIR / "image.txt")) >= 4
    assert len(bench.read_prompts(bench.PROMPTS_DIR / "video.txt")) >= 2


def test_psnr_and_ssim_per_frame_against_known_values():
    reference = torch.full((2, 3, 16, 16), 0.5)
    assert bench.psnr_frames(reference, reference.clone()) == [math.inf, math.inf]
    assert bench.mean_db([math.inf, math.inf]) == math.inf and bench.ssim_frames(reference, reference) == 1.0
    # a +-0.01 checkerboard: mse 1e-4, so 40 dB in every image
    signs = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1
    noisy = reference + 0.01 * signs
    assert bench.psnr_frames(noisy, reference) == pytest.approx([40.0, 40.0], abs=1e-3)
    # Gaussian noise of another level in each frame of a video (B, T, 3, H, W): one PSNR per frame
    generator = torch.Generator().manual_seed(0)
    video = torch.rand((2, 3, 3, 16, 16), generator=generator) * 0.8 + 0.1
    levels = torch.tensor([0.003, 0.01, 0.03]).view(1, 3, 1, 1, 1)
    other = video + levels * torch.randn(video.shape, generator=generator)
    mse = (other - video).square().mean(dim=(2, 3, 4)).flatten()
    expected = [10 * math.log10(1 / m) for m in mse.tolist()]
    values = bench.psnr_frames(other, video)
    assert len(values) == 6 and values == pytest.approx(expected, abs=1e-3)
    assert bench.mean_db(values) == pytest.approx(sum(expected) / 6, abs=1e-3)
    # a frame equal up to rounding (or bit for bit) counts at the cap, not at 150 dB or inf
    assert bench.mean_db([40.0, math.inf]) == pytest.approx((40 + bench.PSNR_CAP_DB) / 2)
    assert bench.mean_db([]) is None


def test_reference_fid_of_a_set_against_itself_is_zero():
    judge = judges.load_judge()
    images, _ = procedural.image_batch(32, 0)
    others, _ = procedural.image_batch(32, 1)
    features = bench.judge_features(judge, images)
    between = bench.reference_fid(features, bench.judge_features(judge, others))
    assert between > 100 and between == pytest.approx(judges.reference_fid(judge, images, others), rel=1e-9)
    assert abs(bench.reference_fid(features, features)) < 1e-5 * between
    videos, _ = procedural.video_batch(2, 0, num_frames=5)
    assert bench.judge_features(judge, videos.transpose(1, 2)).shape == (10, judge.num_features)  # one per frame


def test_pareto_front_of_handmade_points():
    points = [(1.0, math.inf), (1.3, 40.0), (1.2, 35.0), (2.0, 30.0), (1.9, 25.0), (2.0, 30.0), (2.5, 20.0),
              (0.9, 45.0), (2.5, 10.0)]
    # (1.2, 35) and (1.9, 25) are beaten on both axes, (0.9, 45) by dense's inf at a higher speedup,
    # (2.5, 10) by (2.5, 20); the two (2.0, 30) tie and both stay
    assert bench.pareto_front(points) == [0, 1, 3, 5, 6]
    assert bench.pareto_front([]) == [] and bench.pareto_front([(1.0, 1.0)]) == [0]


def test_fewer_steps_match_the_fastest_plan():
    assert bench.fewer_steps(20, 2.0) == (10, "time of the fastest plan")
    assert bench.fewer_steps(20, 1.5)[0] == 13 and bench.fewer_steps(20, 100.0)[0] == 1
    assert bench.fewer_steps(20, 1.01) == (10, "half the steps: no plan was faster")
    assert bench.fewer_steps(20, None)[0] == 10 and bench.fewer_steps(2, 1.2)[0] == 1
