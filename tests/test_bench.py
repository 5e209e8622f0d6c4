"""`dit-accel bench`: the command end to end on a tiny model, its metrics against known values, and
its Pareto front."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import importlib.util
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dit_accel.bench import main as bench_main
from dit_accel.bench.judging import judge_features, reference_fid
from dit_accel.bench.processes import Processes, merge_rows, partials
from dit_accel.bench.prompts import PROMPTS_DIR
from dit_accel.bench.report import pareto_front
from dit_accel.bench.rows import Row, fewer_steps
from dit_accel.cli import main
from dit_accel.loading import UsageError, read_prompts
from dit_accel.metrics import judge as judges
from dit_accel.metrics import procedural
from dit_accel.metrics.quality import PSNR_CAP_DB, PerceptualDistance, mean_db, psnr_frames, ssim_frames

RAS = "ras:sample_ratio=0.5"


def test_peers_sweep_their_knob_one_row_per_value(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n")
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny:sd3", "--steps", "4", "--plan", RAS, "--peers", "steps=2,3",
                 "fbcache=0.05,0.5", "taylorseer=3", "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 0
    rows = {row["label"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert [label for label in rows][3:] == ["dense, 2 steps", "dense, 3 steps", "FirstBlockCache 0.05",
                                             "FirstBlockCache 0.5", "TaylorSeer (every 3rd step)"]
    assert rows["dense, 2 steps"]["steps"] == 2 and rows["dense, 3 steps"]["steps"] == 3
    assert rows["dense, 2 steps"]["flops_ratio"] == pytest.approx(0.5)
    assert rows["FirstBlockCache 0.05"]["configs"][0]["threshold"] == 0.05
    # a larger threshold skips at least as much
    assert rows["FirstBlockCache 0.5"]["flops_ratio"] <= rows["FirstBlockCache 0.05"]["flops_ratio"]
    assert rows["TaylorSeer (every 3rd step)"]["configs"][0]["cache_interval"] == 3
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
        assert 0 < row["ssim"] <= 1 and row["perceptual"] >= 0
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
    # cache-dit's DBCache when it is installed (measured like every row), else a note saying so
    dbcache = [row for label, row in rows.items() if "DBCache" in label]
    if importlib.util.find_spec("cache_dit") is None:
        assert not dbcache and "cache-dit is not installed" in table
    else:
        assert dbcache[0]["status"] == "ok" and dbcache[0]["flops_ratio"] <= 1.0 and dbcache[0]["seconds"] > 0
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
                          (["--peers", "nope"], "invalid choice"),
                          (["--peers", "fastercache=2"], "no setting to sweep"),
                          (["--peers", "fbcache=low"], "must be floats"), (["--peers", "steps=0"], "must be > 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--model", "tiny:sd3", "--out", str(tmp_path), "--quiet", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--help"])
    assert exit_info.value.code == 0 and "--peers" in capsys.readouterr().out


def test_prompt_files_are_lines_or_a_json_list(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("# comment\na red fox\n\n  a blue bird  \n")
    assert read_prompts(lines) == ["a red fox", "a blue bird"]
    listed = tmp_path / "prompts.json"
    listed.write_text('["one", "two, three"]')
    assert read_prompts(listed) == ["one", "two, three"]
    for text in ("[1, 2]", "[broken", ""):
        listed.write_text(text)
        with pytest.raises(UsageError):
            read_prompts(listed)
    assert len(read_prompts(PROMPTS_DIR / "image.txt")) >= 4
    assert len(read_prompts(PROMPTS_DIR / "video.txt")) >= 2


def test_psnr_and_ssim_per_frame_against_known_values():
    reference = torch.full((2, 3, 16, 16), 0.5)
    assert psnr_frames(reference, reference.clone()) == [math.inf, math.inf]
    assert mean_db([math.inf, math.inf]) == math.inf and ssim_frames(reference, reference) == 1.0
    # a +-0.01 checkerboard: mse 1e-4, so 40 dB in every image
    signs = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1
    noisy = reference + 0.01 * signs
    assert psnr_frames(noisy, reference) == pytest.approx([40.0, 40.0], abs=1e-3)
    # Gaussian noise of another level in each frame of a video (B, T, 3, H, W): one PSNR per frame
    generator = torch.Generator().manual_seed(0)
    video = torch.rand((2, 3, 3, 16, 16), generator=generator) * 0.8 + 0.1
    levels = torch.tensor([0.003, 0.01, 0.03]).view(1, 3, 1, 1, 1)
    other = video + levels * torch.randn(video.shape, generator=generator)
    mse = (other - video).square().mean(dim=(2, 3, 4)).flatten()
    expected = [10 * math.log10(1 / m) for m in mse.tolist()]
    values = psnr_frames(other, video)
    assert len(values) == 6 and values == pytest.approx(expected, abs=1e-3)
    assert mean_db(values) == pytest.approx(sum(expected) / 6, abs=1e-3)
    # a frame equal up to rounding (or bit for bit) counts at the cap, not at 150 dB or inf
    assert mean_db([40.0, math.inf]) == pytest.approx((40 + PSNR_CAP_DB) / 2)
    assert mean_db([]) is None


def test_reference_fid_of_a_set_against_itself_is_zero():
    judge = judges.load_judge()
    images, _ = procedural.image_batch(32, 0)
    others, _ = procedural.image_batch(32, 1)
    features = judge_features(judge, images)
    between = reference_fid(features, judge_features(judge, others))
    assert between > 100 and between == pytest.approx(judges.reference_fid(judge, images, others), rel=1e-9)
    assert abs(reference_fid(features, features)) < 1e-5 * between
    videos, _ = procedural.video_batch(2, 0, num_frames=5)
    assert judge_features(judge, videos.transpose(1, 2)).shape == (10, judge.num_features)  # one per frame


def test_perceptual_distance_is_zero_for_the_same_images_and_grows_with_noise():
    metric = PerceptualDistance()
    assert "LPIPS" in metric.name  # LPIPS itself, or the judge's stand-in said to be one
    images, _ = procedural.image_batch(8, 0)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    distances = [metric(images, (images + level * noise).clamp(0, 1)) for level in (0.02, 0.1, 0.3)]
    assert metric(images, images.clone()) == pytest.approx(0.0, abs=1e-12)
    assert 0 < distances[0] < distances[1] < distances[2]
    others, _ = procedural.image_batch(8, 1)
    assert metric(images, others) > distances[0]


def test_pareto_front_of_handmade_points():
    points = [(1.0, math.inf), (1.3, 40.0), (1.2, 35.0), (2.0, 30.0), (1.9, 25.0), (2.0, 30.0), (2.5, 20.0),
              (0.9, 45.0), (2.5, 10.0)]
    # (1.2, 35) and (1.9, 25) are beaten on both axes, (0.9, 45) by dense's inf at a higher speedup,
    # (2.5, 10) by (2.5, 20); the two (2.0, 30) tie and both stay
    assert pareto_front(points) == [0, 1, 3, 5, 6]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]


def test_fewer_steps_match_the_fastest_plan():
    assert fewer_steps(20, 2.0) == (10, "time of the fastest plan")
    assert fewer_steps(20, 1.5)[0] == 13 and fewer_steps(20, 100.0)[0] == 1
    assert fewer_steps(20, 1.01) == (10, "half the steps: no plan was faster")
    assert fewer_steps(20, None)[0] == 10 and fewer_steps(2, 1.2)[0] == 1


# -- several processes (accelerate launch) ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bench_command(out, *options, processes=1):
    """The benchmark as its own process, or under `accelerate launch` with `processes` CPU processes. On a
    machine without a GPU only `--multi_gpu` starts several (torchrun; `--cpu` would start one), and
    the benchmark's `--device cpu` makes them talk over gloo."""
    bench_args = ["--model", "tiny:sd3", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out), *options]
    if processes == 1:
        return [sys.executable, "-m", "dit_accel.bench", *bench_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "dit_accel.bench", *bench_args]


def _finish(process: subprocess.Popen, what: str) -> None:
    try:
        output, _ = process.communicate(timeout=300)  # a process waiting on a peer forever fails, not hangs CI
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{what} did not finish in 300 s:\n{output[-4000:]}")
    assert process.returncode == 0, f"{what} failed:\n{output[-4000:]}"


def test_two_processes_under_accelerate_launch_give_the_one_process_table(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: no `accelerate launch`")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\na green triangle\na yellow star\n")
    # 4 batches of 1: rank 0 runs batches 1 and 3, rank 1 batches 2 and 4; MagCache is calibrated on batch 1
    compared = ["--steps", "4", "--plan", RAS, "--peers", "magcache", "--prompts", str(prompts), "--batch", "1"]
    # one batch for two processes: rank 1 runs nothing and still takes part in the calibration's and the
    # fewer-steps peer's broadcasts and in the gather (at 2 steps the peer runs 1 step whatever the timings)
    idle = ["--steps", "2", "--plan", RAS, "--peers", "steps", "magcache", "--prompts", str(prompts), "--count", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {"one": (_bench_command(tmp_path / "one", *compared), tmp_path / "one"),
            "two": (_bench_command(tmp_path / "two", *compared, processes=2), tmp_path / "two"),
            "idle": (_bench_command(tmp_path / "idle", *idle, processes=2), tmp_path / "idle")}
    # side by side: the timings are not compared, and this keeps the test short
    started = {name: subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for name, (command, _) in runs.items()}
    for name, process in started.items():
        _finish(process, " ".join(runs[name][0]))
    one, two, idle = (json.loads((out / "results.json").read_text()) for _, out in runs.values())

    assert one["processes"] == 1 and two["processes"] == 2 and idle["processes"] == 2
    assert [row["label"] for row in two["rows"]] == [row["label"] for row in one["rows"]] == \
        ["dense", "dense (no hooks)", RAS, "MagCache 0.06 (calibrated)"]
    for ours, theirs in zip(two["rows"], one["rows"]):
        assert ours["status"] == theirs["status"] == "ok" and ours["samples"] == theirs["samples"] == 4
        assert ours["steps"] == theirs["steps"] and ours["flops_ratio"] == theirs["flops_ratio"]
        assert ours["flops"] == theirs["flops"] and ours["identical_to_dense"] == theirs["identical_to_dense"]
        for key in ("psnr_db", "ssim"):
            assert (ours[key] is None) == (theirs[key] is None)
            if ours[key] is not None:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-6)
    assert 0 < two["rows"][2]["flops_ratio"] < 1 and 0 < two["rows"][3]["flops_ratio"] < 1
    note = "2 processes (accelerate launch)"
    assert any(note in line for line in two["notes"]) and not any(note in line for line in one["notes"])
    assert note in (tmp_path / "two" / "results.md").read_text()

    rows = {row["label"]: row for row in idle["rows"]}
    assert idle["call"]["batches"] == 1 and all(row["status"] == "ok" and row["samples"] == 1 for row in rows.values())
    fewer = [row for label, row in rows.items() if label.startswith("dense, 1 steps (")]  # why: from the timings
    assert len(fewer) == 1 and fewer[0]["steps"] == 1 and fewer[0]["kind"] == "peer"


def test_partial_sums_of_processes_merge_into_one_process_row():
    def row(**measured):
        return Row("r", "plan", **measured)

    features = [torch.full((1, 2), float(i)) for i in range(3)]
    single = row(samples=3, seconds=3.0, transformer_seconds=1.5, flops=30.0, dense_flops=60.0, peak_bytes=7,
                 psnr_frames=[30.0, 40.0, 50.0], ssim_sum=2.7, perceptual_sum=0.3, accuracy_sum=2.0,
                 features=features)
    # batch 0 and 2 ran on rank 0, batch 1 on rank 1; rank 2 had none
    parts = [partials([row(samples=2, seconds=2.0, transformer_seconds=1.0, flops=20.0, dense_flops=40.0,
                                 peak_bytes=5, psnr_frames=[30.0, 50.0], ssim_sum=1.8, perceptual_sum=0.2, accuracy_sum=1.0,
                                 features=[features[0], features[2]])], [0, 2]),
             partials([row(samples=1, seconds=1.0, transformer_seconds=0.5, flops=10.0, dense_flops=20.0,
                                 peak_bytes=7, psnr_frames=[40.0], ssim_sum=0.9, perceptual_sum=0.1, accuracy_sum=1.0,
                                 features=[features[1]])], [1]),
             partials([row()], [])]
    merged = [row()]
    merge_rows(merged, parts)
    (got,) = merged
    for key in ("samples", "seconds", "transformer_seconds", "flops", "dense_flops", "ssim_sum", "perceptual_sum",
                "accuracy_sum"):
        assert getattr(got, key) == pytest.approx(getattr(single, key)), key
    assert got.peak_bytes == 7 and got.error is None and sorted(got.psnr_frames) == single.psnr_frames
    assert mean_db(got.psnr_frames) == mean_db(single.psnr_frames)
    assert torch.equal(torch.cat(got.features), torch.cat(single.features))  # back in batch order
    # a row without a handle has no ledger in any process that ran it; one that failed anywhere failed
    bare = [partials([row(transformer_seconds=None, flops=None, dense_flops=None, samples=1)], [0]),
            partials([row(error="RuntimeError: boom")], [])]
    merged = [row()]
    merge_rows(merged, bare)
    assert merged[0].flops is None and merged[0].transformer_seconds is None and merged[0].peak_bytes is None
    assert merged[0].error == "RuntimeError: boom"
    assert Processes(1, 3).share(7) == [1, 4] and Processes(2, 3).share(2) == []
    assert Processes().broadcast("x") == "x" and Processes().gather("x") == ["x"]


def test_repeated_rounds_keep_each_row_once_with_its_median_time(tmp_path):
    """--repeats runs dense and every row that many times per batch; the table counts each sample once
    and takes the median time of the rounds."""
    from dit_accel.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny:sd3", "--steps", "2", "--count", "1", "--batch", "1", "--repeats", "3",
                 "--plan", "ras:sample_ratio=0.5", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["repeats"] == 3
    rows = {row["label"]: row for row in results["rows"]}
    assert rows["dense"]["samples"] == rows["ras:sample_ratio=0.5"]["samples"] == 1
    assert rows["ras:sample_ratio=0.5"]["flops_ratio"] < 1.0 and rows["ras:sample_ratio=0.5"]["psnr_db"] > 10


# -- content: the judge's agreement with dense, the equal-quality table, FID and CLIP score ---------------

def test_judge_agreement_counts_the_readings_that_equal_dense_ones():
    """Clean procedural images are read exactly as their captions say (the judge's real-image accuracy is
    1.0), so the agreement of a set with one image swapped is hand-countable from the scenes' labels."""
    judge = judges.load_judge()
    images, scenes = procedural.image_batch(4, 0)
    other, (stranger,) = procedural.image_batch(1, 7)
    ours = judges.readings(judge, images)
    assert ours == [{k: getattr(s, k) for k in procedural.ATTRIBUTES} for s in scenes]
    swapped = judges.readings(judge, torch.cat([other, images[1:]]))
    same = sum(getattr(stranger, k) == getattr(scenes[0], k) for k in procedural.ATTRIBUTES)
    assert judges.agreement(swapped, ours) == (3 * 6 + same, 4 * 6) and same < 6
    assert judges.agreement(ours, ours) == (24, 24)
    assert judges.agreement([{"shape": "star", "motion": "bouncing"}], [{"shape": "star", "motion": "spinning"}]) == (1, 2)
    videos, _ = procedural.video_batch(2, 0, num_frames=5)
    read = judges.readings(judge, videos)
    assert [sorted(r) for r in read] == [sorted(judges.VIDEO_ATTRIBUTES)] * 2


def _summary_row(label, family, speedup, psnr, flops=0.5, kind="peer", status="ok", **rest):
    return {"label": label, "family": family, "kind": kind, "status": status, "speedup": speedup, "flops_ratio": flops,
            "psnr_db": psnr, "identical_to_dense": psnr is None, "ssim": rest.pop("ssim", 0.95), "perceptual": 0.05,
            "judge_agreement": rest.pop("judge", None), "steps": 20, **rest}


def test_the_equal_quality_table_keeps_each_familys_fastest_row_that_meets_the_target():
    from dit_accel.bench.report import equal_quality
    from dit_accel.tuning.target import Target

    rows = [_summary_row("dense", None, 1.0, None, flops=1.0, kind="dense"),
            _summary_row("plan A", "plan A", 2.0, 31.0, kind="plan"),
            _summary_row("plan B", "plan B", 3.0, 25.0, kind="plan"),
            _summary_row("dense, 10 steps", "fewer steps", 2.0, 33.0),
            _summary_row("dense, 7 steps", "fewer steps", 2.8, 30.5),
            _summary_row("dense, 5 steps", "fewer steps", 4.0, 27.0),
            _summary_row("dense, 6 steps", "fewer steps", 3.3, 30.2, ssim=0.85),  # fast, but misses SSIM
            _summary_row("FirstBlockCache 0.05", "FirstBlockCache", 1.3, None, flops=1.0),  # skips nothing
            _summary_row("FirstBlockCache 0.2", "FirstBlockCache", 1.6, 29.0),
            _summary_row("TaylorSeer (every 3rd step)", "TaylorSeer", 9.9, 40.0, status="failed")]
    table = equal_quality(rows, Target.parse("psnr=30,ssim=0.9"))
    picked = {row["family"]: row for row in table}
    assert list(picked) == ["plan A", "plan B", "fewer steps", "FirstBlockCache"]  # failed rows are left out
    assert picked["plan A"]["meets_target"] and picked["plan A"]["label"] == "plan A"
    assert picked["fewer steps"]["label"] == "dense, 7 steps" and picked["fewer steps"]["settings_meeting"] == 2
    assert not picked["plan B"]["meets_target"] and picked["plan B"]["missed"] == "none of 1 meets it"
    # a row identical to dense meets any target but skips no work: not a pick; the family's closest row stays
    cache = picked["FirstBlockCache"]
    assert not cache["meets_target"] and cache["missed"] == "none of 2 skips work at it"
    assert cache["label"] == "FirstBlockCache 0.05" and cache["psnr_db"] is None
    # the full table's rows are marked
    marks = {row["label"]: (row.get("meets_target"), row.get("fastest_in_family")) for row in rows}
    assert marks["dense, 7 steps"] == (True, True) and marks["dense, 10 steps"] == (True, False)
    assert marks["dense, 6 steps"] == (False, False) and marks["dense"] == (None, None)
    # a distance is kept from above: the closest row of a family none of whose rows meets it is the lowest
    by_distance = equal_quality([_summary_row("x", "f", 2.0, 30.0, perceptual=0.3),
                                 _summary_row("y", "f", 3.0, 30.0, perceptual=0.2)], Target.parse("perceptual=0.1"))
    assert by_distance[0]["label"] == "y" and not by_distance[0]["meets_target"]


def test_bench_equal_end_to_end_on_a_tiny_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n")
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny:sd3", "--steps", "4", "--plan", RAS, "--peers", "steps", "fbcache=0.05,0.5",
                 "--equal", "psnr=15", "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["label"]: row for row in results["rows"]}
    # steps, named without values, sweeps its counts below the call's 4
    assert [label for label in rows][3:] == ["dense, 3 steps", "dense, 2 steps", "dense, 1 steps",
                                             "FirstBlockCache 0.05", "FirstBlockCache 0.5"]
    assert rows["dense, 2 steps"]["family"] == "fewer steps" and rows[RAS]["family"] == RAS
    equal = results["equal_quality"]
    assert equal["target"] == "psnr>=15" and [row["family"] for row in equal["rows"]] == \
        [RAS, "fewer steps", "FirstBlockCache"]
    for row in equal["rows"]:
        family = [r for r in rows.values() if r["family"] == row["family"]]
        meeting = [r for r in family if r["meets_target"] and r["flops_ratio"] < 1]
        assert row["meets_target"] == bool(meeting)
        if meeting:
            assert row["speedup"] == max(r["speedup"] for r in meeting)
            assert rows[row["label"]]["fastest_in_family"]
    table = (out / "results.md").read_text()
    assert "## At equal quality: psnr>=15" in table and "| meets psnr>=15 |" in table
    assert "yes, fastest of its family" in table


class _TinyExtractor(torch.nn.Module):
    """Stand-in for Inception: uint8 images -> 6 features (channel means and spreads)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def test_fid_and_clip_score_with_injected_networks_and_the_refusal_without_weights(tmp_path, monkeypatch, capsys):
    from dit_accel.metrics import fid as fid_metrics

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n")
    common = ["bench", "--model", "tiny:sd3", "--steps", "3", "--plan", RAS, "--prompts", str(prompts), "--quiet"]
    real = tmp_path / "real"
    real.mkdir()
    # no torch-fidelity here (or no weights to download): refused by name, before the model loads
    monkeypatch.setattr("dit_accel.testing.tiny_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    for fid, message in (("dense", "--fid dense: torchmetrics' Inception feature extractor cannot be loaded"),
                         (str(real), "FID needs at least 2 real images")):
        if fid == str(real):
            monkeypatch.setattr(fid_metrics, "load_inception", _TinyExtractor)
        with pytest.raises(SystemExit) as exit_info:
            main([*common, "--fid", fid, "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    monkeypatch.undo()

    monkeypatch.setattr(fid_metrics, "load_inception", _TinyExtractor)
    for i, color in enumerate(((255, 0, 0), (0, 0, 255), (0, 255, 0))):
        Image.new("RGB", (40 + 8 * i, 40), color).save(real / f"{i}.png")  # any sizes
    clip = fid_metrics.ClipScore(lambda images: images.mean((2, 3)),
                                 lambda texts: torch.tensor([[1.0, 0.0, 0.0] if "red" in t else [0.0, 0.0, 1.0]
                                                             for t in texts]), "CLIP score (stand-in)")
    monkeypatch.setattr(fid_metrics.ClipScore, "load", classmethod(lambda cls: clip))
    for fid in ("dense", str(real)):
        out = tmp_path / Path(fid).name
        assert main([*common, "--fid", fid, "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        rows = {row["label"]: row for row in results["rows"]}
        assert results["fid"] == fid and all(row["fid"] > -1e-9 and row["clip_score"] >= 0 for row in rows.values())
        table = (out / "results.md").read_text()
        assert "CLIP score (stand-in)" in table and "FID: torchmetrics' Inception" in table
        if fid == "dense":
            assert rows["dense"]["fid"] == pytest.approx(0, abs=1e-9) and "| FID vs dense |" in table
        else:
            assert rows["dense"]["fid"] > 0 and "3 real images in" in table and "| FID vs real |" in table
    # the CLIP stand-in by hand: one image's mean color against its prompt's direction
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0], images[1, 2] = 1.0, 1.0
    assert clip(images, ["a red one", "a blue one"]) == pytest.approx(100.0)
    assert clip(images, ["a blue one", "a red one"]) == pytest.approx(0.0)


def test_a_suite_shows_the_judges_agreement_and_takes_a_judge_target(tmp_path):
    out = tmp_path / "suite"
    assert main(["bench", "--suite", "image", "--count", "2", "--batch", "2", "--steps", "3", "--plan",
                 "steps:count=2", "--peers", "steps=1", "--equal", "judge=0.5,psnr=5", "--threads", "2", "--out", str(out),
                 "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["label"]: row for row in results["rows"]}
    assert rows["dense"]["judge_agreement"] == 1.0 and rows["dense (no hooks)"]["judge_agreement"] == 1.0
    fewer = rows["steps:count=2"]
    assert 0 <= fewer["judge_agreement"] <= 1 and fewer["meets_target"] == (fewer["judge_agreement"] >= 0.5)
    assert [row["family"] for row in results["equal_quality"]["rows"]] == ["steps:count=2", "fewer steps"]
    table = (out / "results.md").read_text()
    assert "| judge agreement |" in table and "judge agreement: the share of the offline judge's" in table
