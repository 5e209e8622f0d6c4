"""The Gradio UI as a real server, driven through gradio_client: a run, concurrent clients, bad input,
and what a server bound beyond localhost refuses."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
from gradio_client import Client
from helpers import served
from PIL import Image

import torch
from diffusers.hooks import FirstBlockCacheConfig

import dit_accel
import dit_accel.loading
import dit_accel.testing
from dit_accel.ui import Limits, build_app
from dit_accel.ui.forms import config_from, technique_forms

MODEL = "tiny:sd3"


@pytest.fixture(scope="module")
def server():
    with served(build_app([MODEL, "tiny:dit"], limits=Limits(max_steps=8, max_side=256, max_frames=9))) as app:
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


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


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


def test_a_run_shows_both_sides_their_numbers_and_what_was_skipped(server):
    baseline, accelerated, table, gallery, skipped = server.predict(*_inputs(), api_name="/run")
    assert _pixels(baseline).shape == _pixels(accelerated).shape == (64, 64, 3)
    assert "| dense |" in table and "| ras |" in table and "x |" in table
    assert len(skipped) == 3 and skipped[-1]["image_tokens"] < skipped[-1]["total_image_tokens"]
    [ras_map] = gallery
    assert "recomputed" in ras_map["caption"] and _pixels(ras_map["image"]).shape[0] >= 256
    again = server.predict(*_inputs(), api_name="/run")  # the cached baseline: the same picture
    assert np.array_equal(_pixels(again[0]), _pixels(baseline))


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
    gallery = server.predict(*values, api_name="/run")[3]
    assert [item["caption"].split(":")[0] for item in gallery] == [
        "SVG2", "attention density per call (rows, in order) and block (columns)"]


def test_concurrent_clients_each_get_their_solo_result(server):
    solo = {seed: _pixels(server.predict(*_inputs(seed=seed, ras=False, cache="fbcache",
                                                  cache_fields="threshold=0.2"), api_name="/run")[1])
            for seed in (1, 2)}
    with ThreadPoolExecutor(2) as pool:
        jobs = {seed: pool.submit(server.predict, *_inputs(seed=seed, ras=False, cache="fbcache",
                                                           cache_fields="threshold=0.2"), api_name="/run")
                for seed in (1, 2)}
        together = {seed: _pixels(job.result()[1]) for seed, job in jobs.items()}
    assert not np.array_equal(solo[1], solo[2])
    for seed in (1, 2):
        assert np.array_equal(together[seed], solo[seed])


def test_a_plan_spec_or_plan_file_replaces_the_forms(server, tmp_path):
    pipe = dit_accel.loading.load_model(MODEL, "cpu", torch.float32)[0]
    path = tmp_path / "tuned.json"
    dit_accel.save_plan(path, [FirstBlockCacheConfig(threshold=0.5)], pipe, num_inference_steps=3)
    for plan in (str(path), "fbcache:threshold=0.5"):
        table = server.predict(*_inputs(ras=False, plan=plan), api_name="/run")[2]
        assert "FLOPs" in table
    other = tmp_path / "other.json"
    dit_accel.save_plan(other, [FirstBlockCacheConfig(threshold=0.5)], dit_accel.testing.tiny_pipeline("sd3", seed=1),
                        num_inference_steps=3)
    with pytest.raises(Exception, match="does not fit this model"):
        server.predict(*_inputs(plan=str(other)), api_name="/run")
    with pytest.raises(Exception, match="tuned for 3 steps"):
        server.predict(*_inputs(steps=4, plan=str(path)), api_name="/run")


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=20), "steps must be in [1, 8] on this server, got 20"),
    (dict(ras=False), "pick at least one technique or step cache"),
    (dict(cache="fbcache", cache_fields="threshold='high'"), "threshold must be a number"),
    (dict(model="/nonexistent"), "no such local folder, and not a valid hub id"),
])
def test_bad_input_gets_a_message_not_a_stack_trace(server, overrides, message):
    with pytest.raises(Exception) as error:
        server.predict(*_inputs(**overrides), api_name="/run")
    assert message in str(error.value) and "Traceback" not in str(error.value)


def test_a_server_beyond_localhost_serves_only_its_named_models():
    with pytest.raises(dit_accel.loading.UsageError, match="--models"):
        build_app(host="0.0.0.0")
    with served(build_app([MODEL], host="0.0.0.0")) as app:
        client = Client(app.local_url, verbose=False)
        with pytest.raises(Exception, match="tiny:dit is not in the list of choices"):  # Gradio's own check
            client.predict(*_inputs(model="tiny:dit"), api_name="/run")
