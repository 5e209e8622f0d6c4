"""`dit-accel gpu-check --small` runs here, so the GPU check cannot rot between the sessions a GPU is lent
to: every row it promises is in its JSON, every keep-all equals dense, the layer part's forced rows
measure the sparse paths (not a dense fallback), and the markdown says what ran where."""

from __future__ import annotations

import json

import pytest

from dit_accel import gpu_check
from dit_accel.cli import main
from dit_accel.runtime.attention_route import SDPA_BACKENDS


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert main(["gpu-check", "--small", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_row_is_there_and_keep_all_equals_dense(report):
    report, _ = report
    rows = report["rows"]
    assert report["environment"]["dtype"] == "float32" and report["environment"]["small"]
    assert report["failures"] == 0 and not [row for row in rows if row["status"] in ("error", "mismatch", "skipped")]
    families = [row for row in rows if row["part"] == "families"]
    lacking = {row["backend"] for row in families if row["check"] == "backend"}
    backends = [b for b in SDPA_BACKENDS if b not in lacking]
    assert "native" in backends
    techniques = gpu_check.technique_classes()
    families = [row for row in families if row["check"] != "backend"]
    expected = {(family, backend, plan) for family in gpu_check.SMALL["families"] for backend in backends
                for plan in ["dense"] + [f"{c.name}.keep_all()" for c in techniques]}
    expected |= {(family, "native", f"{c.name}:preset={p}") for family in gpu_check.SMALL["families"]
                 for c in techniques for p in c.presets}
    assert {(row["family"], row["backend"], row["plan"]) for row in families} == expected
    keep_all = [row for row in families if row["check"] == "keep_all"]
    assert all(row["status"] == "ok" and row["error"] <= report["tolerance"] for row in keep_all)


def test_the_layer_and_the_models_ran_their_sparse_paths(report):
    report, _ = report
    layer = [row for row in report["rows"] if row["part"] == "layer"]
    expected = ["dense SDPA alone", "dense"] + [label for label, _ in gpu_check.layer_configs(small=True)]
    assert [(row["model"], row["row"]) for row in layer] == [(m, r) for m in gpu_check.LAYER_MODELS for r in expected]
    assert all(row["ms"] > 0 for row in layer)
    assert all(row["flops_ratio"] > 0 for row in layer if row["row"] not in ("dense SDPA alone", "dense"))
    forced = [row for row in layer if "plan_every_layer" in row["row"] or row["row"].startswith("flexdit")]
    assert len(forced) == 6 and not [row for row in forced if "ran dense" in row.get("detail", "")]
    models = [row for row in report["rows"] if row["part"] == "models"]
    labels = [label for label, _ in gpu_check.model_plans(gpu_check.SMALL["models_steps"])]
    expected = [(model, plan) for model in gpu_check.SMALL["models"] for plan in labels]
    assert [(row["model"], row["plan"]) for row in models] == expected
    assert all(row["seconds"] > 0 and row["flops_ratio"] > 0 for row in models)
    assert all(row["flops_ratio"] < 1 for row in models if row["plan"].startswith("ras"))


def test_the_markdown_names_the_machine_dtype_and_shapes(report):
    _, text = report
    assert "torch " in text and "dtype: float32" in text and "reduced (--small" in text
    for heading in ("## Tiny pipelines", "## One attention layer", "## Random-weight transformers"):
        assert heading in text
    assert "2x30x52 = 3,120 tokens" in text and "| n/a |" in text
