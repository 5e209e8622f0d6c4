"""The self-distillation fine-tune (`dit_accel.finetune`) and FlexDiT's LoRA adapters, on tiny SD3 pipelines."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
import sys

import pytest
import torch

from dit_accel import ConfigError, FlexDiTConfig, RASConfig, apply
from dit_accel.finetune import finetune
from dit_accel.finetune.loop import CHECKPOINT
from dit_accel.models.base import TokenGrid
from dit_accel.runtime.estimate import CallShapes
from dit_accel.testing import tiny_pipeline

pytest.importorskip("peft")

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
CALL = dict(num_inference_steps=4, guidance_scale=4.0, height=64, width=64, max_sequence_length=16)
POOLED = FlexDiTConfig(sparse_blocks=(0, 1), schedule=None)


def _latents(pipe, seed: int = 3) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(seed), output_type="latent", **CALL).images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Adapters trained for 40 steps on a tiny SD3, with the pipeline they were trained on."""
    pipe = tiny_pipeline("sd3")
    out = tmp_path_factory.mktemp("flexdit")
    config = finetune(pipe, POOLED, prompts=PROMPTS, out=out, steps=40, batch_size=4, learning_rate=3e-3,
                      progress=False, **CALL)
    return pipe, config, out


def _distillation_error(pipe, config, out) -> float:
    """The mean squared error of `config`'s transformer against the dense targets kept in `out`."""
    from dit_accel.finetune.targets import output_sample
    from dit_accel.finetune.targets import TargetCall
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    calls = [TargetCall.from_record(r) for r in torch.load(out / "targets.pt", weights_only=True)["calls"]]
    errors = []
    with apply(pipe.transformer, config), torch.no_grad():
        for call in calls:
            args, kwargs = call.inputs(torch.arange(call.rows), torch.device("cpu"), torch.float32)
            _set_cache_context(pipe.transformer, CacheContext(call.cache_name, call.step_index, call.num_steps))
            try:
                errors.append((output_sample(pipe.transformer(*args, **kwargs)) - call.output).pow(2).mean())
            finally:
                _set_cache_context(pipe.transformer, None)
    return float(torch.stack(errors).mean())


def test_training_lowers_the_distillation_error_and_writes_a_plan(trained):
    pipe, config, out = trained
    assert config.adapters is not None and os.path.isfile(config.adapters)
    before, after = _distillation_error(pipe, POOLED, out), _distillation_error(pipe, config, out)
    assert after < 0.8 * before, (before, after)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["configs"][0]["fields"]["adapters"] == {"file": "flexdit_adapters.safetensors"}
    assert plan["finetune"]["training_steps"] == 40 and plan["finetune"]["prompts"] == 4


def test_the_plan_file_and_its_adapters_move_together(trained, tmp_path):
    import shutil

    from dit_accel import load_plan

    pipe, config, out = trained
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("*.pt"))
    check, loaded = load_plan(moved / "plan.json")
    assert loaded.adapters == str(moved / "flexdit_adapters.safetensors")
    with apply(pipe, check, loaded):
        moved_output = _latents(pipe)
    with apply(pipe, config):
        assert torch.equal(moved_output, _latents(pipe))


def test_adapters_round_trip_and_remove_leaves_the_model_bit_identical(trained):
    pipe, config, _ = trained
    transformer = pipe.transformer
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    flags = {k: p.requires_grad for k, p in transformer.named_parameters()}
    dense = _latents(pipe)
    handle = apply(pipe, config)
    from safetensors.torch import load_file

    saved = load_file(config.adapters)
    (technique,) = handle.techniques
    merged = technique._merged
    assert merged.linears and len(saved) == 2 * len(merged.linears)
    assert not any(hasattr(module, "lora_A") for module in transformer.modules())  # merged: no LoRA layers
    adapted = _latents(pipe)
    assert torch.equal(adapted, _latents(pipe))  # the same file, the same output
    for name, linear in merged.linears.items():  # each adapted linear ran on W + B A
        expected = linear.weight + saved[f"{name}.lora_B"] @ saved[f"{name}.lora_A"]
        torch.testing.assert_close(merged.weight(name, linear), expected)
    shapes = CallShapes(samples=2, grid=TokenGrid(1, 4, 4), text_tokens=8, itemsize=4, hidden=64, output_channels=64)
    assert technique.estimate_bytes(shapes) == {"adapter_weights": 4 * merged.weight_elements()}
    handle.remove()
    training_free = apply(pipe, POOLED)
    plain = _latents(pipe)
    training_free.remove()
    assert not torch.allclose(adapted, plain)  # the adapters change what the pooled blocks give
    assert transformer.state_dict().keys() == state.keys()
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in state.items())
    assert {k: p.requires_grad for k, p in transformer.named_parameters()} == flags
    assert "peft_config" not in vars(transformer)
    assert torch.equal(_latents(pipe), dense)


def test_adapters_are_refused_for_another_model_or_another_pooling(trained):
    _, config, _ = trained
    other = tiny_pipeline("sd3", seed=1)
    with pytest.raises(ConfigError, match="does not fit this transformer.*other weights"):
        apply(other, config)
    pipe = trained[0]
    import dataclasses

    with pytest.raises(ConfigError, match="trained for another pooling: sparse_blocks"):
        apply(pipe, dataclasses.replace(config, sparse_blocks=(0, 0)))
    from dit_accel import DyDiTConfig

    with pytest.raises(ConfigError, match="LoRA layers on linears that DyDiTConfig slices"):
        apply(pipe, config, DyDiTConfig(width_ratio=0.5))
    assert "peft_config" not in vars(pipe.transformer)


def test_a_plan_with_nothing_to_train_is_refused_before_any_work(tmp_path):
    pipe = tiny_pipeline("sd3")
    with pytest.raises(ConfigError, match="nothing to fine-tune.*FlexDiTConfig: LoRA adapters"):
        finetune(pipe, RASConfig(), prompts=PROMPTS, out=tmp_path, steps=1, **CALL)
    with pytest.raises(ConfigError, match="minutes=... or steps="):
        finetune(pipe, POOLED, prompts=PROMPTS, out=tmp_path, **CALL)
    pipe.transformer.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        finetune(pipe, POOLED, prompts=PROMPTS, out=tmp_path, steps=1, **CALL)
    assert not (tmp_path / "targets.pt").exists()


def test_a_fine_tune_started_again_resumes_from_its_checkpoint(tmp_path):
    pipe = tiny_pipeline("sd3")
    first = finetune(pipe, POOLED, prompts=PROMPTS[:2], out=tmp_path, steps=3, batch_size=2, progress=False, **CALL)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    targets = (tmp_path / "targets.pt").stat().st_mtime_ns
    again = finetune(pipe, POOLED, prompts=PROMPTS[:2], out=tmp_path, steps=5, batch_size=2, progress=False, **CALL)
    assert again.adapters == first.adapters
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 5
    assert json.loads((tmp_path / "plan.json").read_text())["finetune"]["training_steps"] == 5
    assert (tmp_path / "targets.pt").stat().st_mtime_ns == targets  # the dense targets were read back


def _command(out, prompts, processes):
    options = ["--model", "tiny:sd3", "--device", "cpu", "--threads", "1", "--quiet", "--plan",
               "flexdit:sparse_blocks=(0,1),schedule=None", "--prompts", str(prompts), "--steps", "3", "--height", "64",
               "--width", "64", "--batch", "2", "--train-steps", "4", "--lr", "0.003", "--out", str(out)]
    if processes == 1:
        return [sys.executable, "-m", "dit_accel.finetune", *options]
    from tests.test_bench import _free_port

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "dit_accel.finetune", *options]


def test_two_processes_under_accelerate_launch_train_what_one_does(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {n: subprocess.Popen(_command(tmp_path / str(n), prompts, n), cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in (1, 2)}
    for n, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-4000:]
    from safetensors.torch import load_file

    one, two = (load_file(tmp_path / str(n) / "flexdit_adapters.safetensors") for n in (1, 2))
    assert one.keys() == two.keys()
    assert any(v.abs().sum() > 0 for k, v in one.items() if k.endswith("lora_B"))  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-6, rtol=1e-4)
    assert json.loads((tmp_path / "2" / "plan.json").read_text())["finetune"]["processes"] == 2


def test_the_command_says_what_is_missing_before_loading_a_model(tmp_path):
    from dit_accel.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", "tiny:sd3", "--plan", "ras", "--train-steps", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["finetune", "--model", "tiny:sd3", "--plan", "flexdit", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_tune_tries_a_fine_tuned_member_alone_and_stacked(trained):
    import dit_accel

    pipe, config, _ = trained
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in CALL.items() if k != "num_inference_steps"}
    result = dit_accel.tune(pipe, PROMPTS[:2], target="psnr=5", steps=4, batch=2, budget="60gen", members=[config],
                            **call)
    mine = [c for c in result.candidates if any(m is config for m in c.configs)]
    assert mine and mine[0].batches, "the fine-tuned member is measured"
    assert "adapters=" in mine[0].label


def test_adapters_run_only_at_the_steps_that_pool(tmp_path):
    """A schedule with dense steps: the adapters learn from the pooled steps only, and at a dense step the
    plan runs the model as it is (no adapter work in the ledger, the dense step's own FLOPs)."""
    pipe = tiny_pipeline("sd3")
    half = FlexDiTConfig(sparse_blocks=(0, 1), schedule=(0.25, 0.25), dense_fraction=0.5)
    config = finetune(pipe, half, prompts=PROMPTS[:2], out=tmp_path, steps=5, batch_size=2, learning_rate=3e-3,
                      progress=False, **CALL)
    with apply(pipe, half):
        plain = _latents(pipe)
    with apply(pipe, config) as handle:
        (technique,) = handle.techniques
        active = []
        hook = pipe.transformer.register_forward_hook(lambda *_: active.append(technique._merged.active))
        adapted = _latents(pipe)
        hook.remove()
        steps = handle.report()["steps"]
    assert active == [True, True, False, False]
    assert all(s["flops"] == pytest.approx(s["dense_flops"]) for s in steps[2:])
    assert not torch.equal(adapted, plain)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "finetuned").glob("*/plan.json"))


@pytest.mark.parametrize("plan", SHIPPED, ids=lambda p: p.parent.name)
def test_the_shipped_fine_tuned_plans_fit_the_reference_image_model(plan):
    """The plans docs/BENCHMARKS.md measures load on the model they were trained for, from any checkout."""
    from dit_accel import load_plan
    from dit_accel.testing.reference import reference_call_kwargs, reference_pipeline

    pipe = reference_pipeline("image")
    pipe.set_progress_bar_config(disable=True)
    with apply(pipe, *load_plan(plan)) as handle:
        pipe(**reference_call_kwargs("image", prompt=["a red circle"]))
        assert handle.report()["flops_ratio"] < 1
