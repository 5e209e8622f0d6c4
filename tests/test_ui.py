"""The Gradio UI as a real server, driven through gradio_client: runs of one and several plans, a video,
concurrent clients, cancel, bad input, what a server bound beyond localhost refuses, and the charts'
pieces that a picture cannot show."""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.utils import Status
from helpers import served
from PIL import Image

import torch
from diffusers.hooks import FirstBlockCacheConfig

import dit_accel
import dit_accel.loading
import dit_accel.testing
from dit_accel.ui import Limits, build_app
from dit_accel.ui.charts import best_tradeoffs, shares_per_step
from dit_accel.tuning import Budget, CandidateStatus
from dit_accel.ui.forms import config_from, technique_forms
from dit_accel.ui.report_view import step_spans
from dit_accel.ui.tune_tab import TuneProgress

MODEL = "tiny:sd3"
#: what /run returns, in order (the page's State is not part of the API)
RUN_OUTPUTS = ("status", "baseline", "plan1", "plan2", "plan3", "plan4", "table", "pareto", "picked", "slider",
               "difference", "numbers", "maps", "flops", "shares", "frames", "per_step", "file")
RAS = "ras:warmup_steps=1,error_reset_steps=()"


@pytest.fixture(scope="module")
def server():
    with served(build_app([MODEL, "tiny:dit", "tiny:wan"], limits=Limits(max_steps=200, max_side=256, max_frames=9,
                                                                         max_tune_generations=40))) as app:
        yield Client(app.local_url, verbose=False)


def _inputs(seed: int = 0, steps: int = 3, ras: bool = True, **overrides):
    """The page's inputs in order: the call, the step cache, the plan text, then each technique's switch and
    fields."""
    values = dict(model=MODEL, prompt="a red circle", negative="", seed=seed, steps=steps, guidance=4.0, height=64,
                  width=64, frames=1, cache="none", cache_fields="", plan="")
    values.update(overrides)
    techniques = []
    for form in technique_forms():
        shown = form.values_of(None)
        if form.name == "ras":
            shown = [{"warmup_steps": 1, "error_reset_steps": "()"}.get(f.name, v) for f, v in zip(form.fields, shown)]
        techniques += [ras and form.name == "ras", *shown]
    return [*values.values(), *techniques]


def _run(client: Client, *inputs) -> dict:
    return dict(zip(RUN_OUTPUTS, client.predict(*inputs, api_name="/run")))


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _shown(update: dict) -> np.ndarray:
    assert update["visible"], update
    return _pixels(update["value"])


def test_forms_come_from_every_built_config_and_round_trip():
    forms = {form.name: form for form in technique_forms()}
    assert {"ras", "svg2", "proxy", "flexdit", "dydit"} <= set(forms)
    for form in forms.values():
        assert config_from(form, form.values_of(None)) == form.config_class()
        for preset in form.presets:
            assert config_from(form, form.values_of(preset)) == form.config_class.preset(preset)
    with pytest.raises(dit_accel.ConfigError, match="local_window"):
        proxy = forms["proxy"]
        config_from(proxy, ["(1, 5, 5)" if f.name == "local_window" else v
                            for f, v in zip(proxy.fields, proxy.values_of(None))])


def test_a_run_shows_enlarged_outputs_their_difference_numbers_and_what_was_skipped(server):
    page = _run(server, *_inputs())
    baseline, accelerated = _shown(page["baseline"]), _shown(page["plan1"])
    assert baseline.shape == accelerated.shape == (384, 384, 3)  # 64 px, 6x
    assert np.array_equal(baseline[::6, ::6].repeat(6, 0).repeat(6, 1), baseline), "nearest, not smoothed"
    assert page["baseline"]["label"] == "baseline (dense): 64x64 px, shown 6x (nearest)"
    assert not page["plan2"]["visible"]
    assert "| dense |" in page["table"] and "| ras |" in page["table"]
    assert re.search(r"perceptual: (LPIPS|judge feature distance)", page["table"])
    slider = [_pixels(side) for side in page["slider"]]
    assert np.array_equal(slider[0], baseline) and np.array_equal(slider[1], accelerated)
    assert "PSNR" in page["numbers"] and "SSIM" in page["numbers"] and "perceptual" in page["numbers"]
    charts = {name: page[name] for name in ("difference", "flops", "shares")} | {"pareto": page["pareto"]["value"]}
    for name, path in charts.items():
        picture = _pixels(path)
        assert picture.shape[1] >= 384 and picture.std() > 10, name
    assert page["frames"]["visible"] is False  # an image has no frames to chart
    per_step = page["per_step"]
    assert len(per_step) == 3 and per_step[-1]["image_tokens"] < per_step[-1]["total_image_tokens"]
    with open(page["file"]) as file:
        saved = json.load(file)
    assert saved["plan"] == "ras" and saved["per_step"] == per_step and saved["report"]["num_steps"] == 3
    [ras_map] = page["maps"]["value"]
    assert ras_map["caption"] == "RAS: how often each region was recomputed, in how many of the 3 steps (8x8 tokens)"
    again = _run(server, *_inputs())  # the cached baseline: the same run, not run again
    assert np.array_equal(_shown(again["baseline"]), baseline)
    dense_row = next(line for line in page["table"].splitlines() if line.startswith("| dense |"))
    assert dense_row in again["table"].splitlines()


def test_the_estimate_comes_from_the_last_runs_speed(server):
    assert server.predict("tiny:dit", "a red circle", "", 0, 3, 4.0, 64, 64, 1, "fbcache",
                          api_name="/estimate").startswith("estimate: none yet; the first run on this model")
    _run(server, *_inputs(seed=7, plan="fbcache"))
    cached = server.predict(MODEL, "a red circle", "", 7, 3, 4.0, 64, 64, 1, "fbcache\nras", api_name="/estimate")
    assert re.fullmatch(r"estimate: about \d+ s for 2 generation\(s\) of 3 steps, from the last run's speed", cached)
    fresh = server.predict(MODEL, "a red circle", "", 8, 3, 4.0, 64, 64, 1, "fbcache", api_name="/estimate")
    assert "for 2 generation(s)" in fresh  # a new seed: the baseline runs too


def test_two_plans_come_out_as_two_columns_in_one_table(server):
    page = _run(server, *_inputs(seed=3, plan=f"{RAS}\nfbcache:threshold=0.2"))
    assert page["plan1"]["label"].startswith(RAS) and page["plan2"]["label"].startswith("fbcache:threshold=0.2")
    assert not np.array_equal(_shown(page["plan1"]), _shown(page["plan2"])) and not page["plan3"]["visible"]
    assert f"| {RAS} |" in page["table"] and "| fbcache:threshold=0.2 |" in page["table"]
    assert [label for label, _ in page["picked"]["choices"]] == [RAS, "fbcache:threshold=0.2"]
    inspected = server.predict("fbcache:threshold=0.2", api_name="/inspect")
    assert "fbcache:threshold=0.2" in inspected[2] and not inspected[3]["visible"]  # a step cache draws no map
    with pytest.raises(Exception, match="at most 4 plans at once"):
        server.predict(*_inputs(plan="\n".join(["fbcache"] * 5)), api_name="/run")


def test_width_and_token_density_are_drawn_per_step_and_block(server):
    page = _run(server, *_inputs(plan="flexdit:preset=fast\ndydit:preset=fast"))
    assert [item["caption"] for item in page["maps"]["value"]] == [
        "FlexDiT token density per step (rows, alike steps merged) and block (columns); 1 = dense"]
    dydit = server.predict("dydit:preset=fast", api_name="/inspect")
    assert [item["caption"].split(" per step")[0] for item in dydit[3]["value"]] == [
        "DyDiT width (heads and channel groups kept)", "DyDiT MLP tokens computed"]
    assert all(_pixels(item["image"]).std() > 10 for item in dydit[3]["value"])


def test_tune_progress_counts_what_tune_ran_and_keeps_the_fastest_that_met_the_target():
    pipe, defaults = dit_accel.loading.load_model(MODEL, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    shown = []
    tracker = TuneProgress(lambda share, desc: shown.append((share, desc)), Budget(seconds=None, generations=30),
                        lambda: None)
    result = dit_accel.tune(pipe, ["a red circle", "a blue square"], target="psnr=5", steps=3, batch=2,
                            budget="30gen", progress=tracker.say, on_measured=tracker.measured_candidate,
                            height=64, width=64,
                            callback_on_step_end=tracker.on_step)
    assert tracker.generations == result.generations and shown[-1][0] == result.generations / 30
    finished = [c for c in result.candidates if c.status in (CandidateStatus.MEETS_TARGET,
                                                               CandidateStatus.MISSES_TARGET)]
    met = [c for c in finished if c.status is CandidateStatus.MEETS_TARGET]
    assert finished and tracker.measured == len(finished)
    fastest = max(met, key=lambda c: c.speedup)
    assert tracker.best[1].startswith(f"{fastest.label} ({fastest.speedup:.2f}x, psnr ")


def test_block_grids_merge_alike_consecutive_steps():
    rows, spans = step_spans([[1.0, 0.5], [1.0, 0.5], [0.5, 0.5], [1.0, 0.5]], [0, 1, 2, 3])
    assert rows == [[1.0, 0.5], [0.5, 0.5], [1.0, 0.5]] and spans == ["0-1", "2", "3"]


def test_the_pareto_chart_keeps_the_best_tradeoffs_and_the_share_chart_reads_declared_stats():
    assert best_tradeoffs([(1.0, 40.0), (2.0, 30.0), (1.5, 25.0), (0.9, 50.0)]) == [(2.0, 30.0), (1.0, 40.0),
                                                                                  (0.9, 50.0)]
    report = {"steps": [{"flops_ratio": 1.0, "calls": [{"image_tokens": 64, "total_image_tokens": 64,
                                                        "pooled_kv_blocks": 0, "flexdit_density": 0.5}]},
                        {"flops_ratio": 0.5, "calls": [{"image_tokens": 16, "total_image_tokens": 64,
                                                        "pooled_kv_blocks": 0, "flexdit_density": 1.0}]}]}
    # tokens as a share of the image's; a density; a count (pooled blocks) is not a share
    assert shares_per_step(report) == {"FLOPs": [1.0, 0.5], "image tokens": [1.0, 0.25],
                                       "flexdit density": [0.5, 1.0]}


def test_a_video_plays_side_by_side_with_its_framewise_psnr(server):
    page = _run(server, *_inputs(model="tiny:wan", ras=False, cache="fbcache", cache_fields="threshold=0.3",
                                 frames=5, height=32, width=32))
    for side in ("baseline", "plan1"):
        assert page[side]["value"].endswith(".gif") and "32x32 px, 5 frames, shown 12x" in page[side]["label"]
        with Image.open(page[side]["value"]) as gif:
            assert gif.size == (384, 384) and gif.n_frames == 5
    assert page["frames"]["visible"] and _pixels(page["frames"]["value"]).std() > 10


def test_sparse_attention_runs_draw_clusters_and_density(server):
    values = _inputs(ras=False)
    at = 12  # after the call's inputs, the step cache and the plan text
    for form in technique_forms():
        if form.name == "svg2":
            values[at] = True
            for i, field in enumerate(form.fields):
                # 64 tokens cannot pay for k-means: planned anyway, so that there are clusters to draw
                values[at + 1 + i] = {"query_clusters": "4", "key_clusters": "8", "dense_warmup": 0.0,
                                      "plan_every_layer": True}.get(field.name, values[at + 1 + i])
        at += 1 + len(form.fields)
    clusters, density = (item["caption"] for item in _run(server, *values)["maps"]["value"])
    assert clusters.startswith("SVG2: query clusters of one head: 4 of them in block ")
    assert "step 2; attention density: 0." in clusters and clusters.endswith(" kept")
    assert density == "attention density per step (rows, alike steps merged) and block (columns); 1 = dense"


def test_concurrent_clients_each_get_their_solo_result(server):
    def plan1(seed: int, client: Client = server) -> np.ndarray:
        return _shown(_run(client, *_inputs(seed=seed, ras=False, cache="fbcache", cache_fields="threshold=0.2"))["plan1"])

    solo = {seed: plan1(seed) for seed in (1, 2)}
    with ThreadPoolExecutor(2) as pool:
        jobs = {seed: pool.submit(plan1, seed) for seed in (1, 2)}
        together = {seed: job.result() for seed, job in jobs.items()}
    assert not np.array_equal(solo[1], solo[2])
    for seed in (1, 2):
        assert np.array_equal(together[seed], solo[seed])


def test_cancel_stops_a_run_and_leaves_the_model_as_it_was(server):
    quick = _inputs(seed=5, plan=RAS)
    before = _shown(_run(server, *quick)["plan1"])
    job = server.submit(*_inputs(seed=6, steps=200, height=256, width=256, plan=RAS), api_name="/run")
    deadline = time.monotonic() + 120
    while not (job.status().code == Status.PROGRESS and "step" in str(job.status().progress_data)):
        assert time.monotonic() < deadline and not job.done(), "the long run never reported a step"
        time.sleep(0.1)
    server.predict(api_name="/cancel")
    status = job.result(timeout=120)[0]
    assert status.startswith("cancelled after") and "the model is as it was" in status
    # the plan was removed (applying it again would be refused otherwise) and nothing of it stayed behind
    assert np.array_equal(_shown(_run(server, *quick)["plan1"]), before)


def test_a_plan_spec_or_plan_file_replaces_the_forms(server, tmp_path):
    pipe = dit_accel.loading.load_model(MODEL, "cpu", torch.float32)[0]
    path = tmp_path / "tuned.json"
    dit_accel.save_plan(path, [FirstBlockCacheConfig(threshold=0.5)], pipe, num_inference_steps=3)
    for plan in (str(path), "fbcache:threshold=0.5"):
        assert "FLOPs" in _run(server, *_inputs(ras=False, plan=plan))["table"]
    other = tmp_path / "other.json"
    dit_accel.save_plan(other, [FirstBlockCacheConfig(threshold=0.5)], dit_accel.testing.tiny_pipeline("sd3", seed=1),
                        num_inference_steps=3)
    with pytest.raises(Exception, match="does not fit this model"):
        server.predict(*_inputs(plan=str(other)), api_name="/run")
    with pytest.raises(Exception, match="tuned for 3 steps"):
        server.predict(*_inputs(steps=4, plan=str(path)), api_name="/run")


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=300), "steps must be in [1, 200] on this server, got 300"),
    (dict(ras=False), "pick at least one technique or step cache"),
    (dict(cache="fbcache", cache_fields="threshold='high'"), "threshold must be a number"),
    (dict(model="/nonexistent"), "no such local folder, and not a valid hub id"),
])
def test_bad_input_gets_a_message_not_a_stack_trace(server, overrides, message):
    with pytest.raises(Exception) as error:
        server.predict(*_inputs(**overrides), api_name="/run")
    assert message in str(error.value) and "Traceback" not in str(error.value)


@pytest.mark.parametrize("tune, message", [
    (dict(budget="100gen"), "budget must be at most 40gen on this server, got 100gen"),
    (dict(target="psnr"), "psnr needs a value"),
    (dict(prompts=""), "write the tuning prompts in the box"),
    (dict(source="image", count=0), "captions from a suite must be in [1, 64], got 0"),
    (dict(target="judge=0.9"), "judge cannot be evaluated here"),
])
def test_bad_tuning_input_is_refused_before_anything_runs(server, tune, message):
    values = dict(target="psnr=30", budget="20gen", batch=2, source="the prompt box below", count=8,
                  prompts="a red circle")
    values.update(tune)
    with pytest.raises(Exception) as error:
        server.predict(*_inputs()[:9], *values.values(), api_name="/tune")
    assert message in str(error.value) and "Traceback" not in str(error.value)


def test_a_server_beyond_localhost_serves_only_its_named_models():
    with pytest.raises(dit_accel.loading.UsageError, match="--models"):
        build_app(host="0.0.0.0")
    with served(build_app([MODEL], host="0.0.0.0")) as app:
        client = Client(app.local_url, verbose=False)
        with pytest.raises(Exception, match="tiny:dit is not in the list of choices"):  # Gradio's own check
            client.predict(*_inputs(model="tiny:dit"), api_name="/run")
        with pytest.raises(Exception, match="tiny:dit is not in the list of choices"):
            client.predict(*_inputs(model="tiny:dit")[:9], "psnr=30", "20gen", 2, "the prompt box below", 8, "a red",
                           api_name="/tune")
