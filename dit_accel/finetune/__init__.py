"""`dit_accel.finetune(pipe, config, prompts=..., minutes=... or steps=..., out=DIR)`: a short data-free
self-distillation that makes a plan hold quality, returning the config that carries what was trained.

What is trained is the plan's techniques' own (`Technique.trains`): FlexDiT's LoRA adapters on its
pooled blocks (peft), DyDiT's timestep-wise width routers and token routers. The dense pipeline runs
on the prompts and its transformer calls are the targets (`targets.py`); the plan's transformer then
learns to give those outputs at those inputs, each call at the step it was recorded at (`loop.py`).
Devices, mixed precision and several processes come from accelerate
(`accelerate launch -m dit_accel.finetune --model ... --plan ...`: the command is `command.py`); N
processes take the same steps as one. Everything lands in `out`: the trained file, `plan.json` (for
`--plan`, `load_plan` and `acceleration=`), the targets and a checkpoint, from which a fine-tune
started again into the same folder resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..api import apply
from ..config import ConfigError
from ..models.identity import model_identity
from ..plan_files import plan_summary, save_plan
from ..runtime.registry import check_composable, registration, registrations
from ..runtime.training import TrainingSettings
from .loop import Distillation, LoopSettings
from .targets import TargetCall, collect

TARGETS = "targets.pt"
PLAN = "plan.json"


def trainable_members(configs: Sequence[Any]) -> list[Any]:
    """The configs of a plan with something to train; a `ConfigError` naming what can be when none has."""
    members = [c for c in configs if getattr(registration(c).technique, "trains", None)]
    if not members:
        able = "; ".join(f"{r.config_class.__name__}: {r.technique.trains}" for r in registrations()
                         if getattr(r.technique, "trains", None))
        raise ConfigError(f"this plan ({plan_summary(list(configs))}) has nothing to fine-tune; what can be: {able}")
    return members


def _check(pipe: Any, prompts: Any, minutes: float | None, steps: int | None, call_kwargs: dict) -> list[str]:
    if getattr(pipe, "transformer", None) is None:
        raise ConfigError(f"finetune takes a diffusers pipeline with a transformer, got {type(pipe).__name__}")
    if getattr(pipe, "transformer_2", None) is not None:
        raise ConfigError("finetune trains one transformer; this pipeline has two (Wan 2.2): not supported yet")
    if getattr(pipe.transformer, "is_gradient_checkpointing", False):
        raise ConfigError("finetune cannot train under gradient checkpointing: its recomputation runs after the "
                          "plan's call has ended, without the plan; call pipe.transformer.disable_gradient_checkpointing()")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("finetune(prompts=...) needs a non-empty list of prompts")
    if minutes is None and steps is None:
        raise ConfigError("finetune needs minutes=... or steps=... (how long to train)")
    if (minutes is not None and minutes <= 0) or (steps is not None and steps < 1):
        raise ConfigError(f"finetune: minutes must be > 0 and steps >= 1, got minutes={minutes}, steps={steps}")
    taken = {"prompt", "generator", "output_type"} & set(call_kwargs)
    if taken:
        raise ConfigError(f"finetune sets {', '.join(sorted(taken))} itself; give the prompts as prompts=[...]")
    return prompts


def _targets(pipe: Any, prompts: list[str], call_kwargs: dict, batch_size: int, seed: int, accelerator: Any,
             out: Path, progress: bool) -> list[TargetCall]:
    """The dense calls over `prompts`: from `out`'s targets file when it was made for the same prompts,
    call and model; else collected, each process its share of the batches, then gathered."""
    from accelerate.utils import gather_object

    made_for = repr((prompts, sorted((k, repr(v)) for k, v in call_kwargs.items()), batch_size, seed,
                     model_identity(pipe.transformer)))
    path = out / TARGETS
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("made_for") == made_for:
            return [TargetCall.from_record(r) for r in saved["calls"]]
    starts = list(range(0, len(prompts), batch_size))
    mine = starts[accelerator.process_index::accelerator.num_processes]
    show = progress and accelerator.is_main_process
    collected = []
    for number, start in enumerate(mine):
        if show:
            print(f"dense targets: batch {number + 1} of {len(mine)}", flush=True)
        calls = collect(pipe, prompts[start:start + batch_size], call_kwargs, seed + start)
        collected.append((start, [c.record() for c in calls]))
    if accelerator.num_processes > 1:
        collected = gather_object(collected)
    records = [r for _, calls in sorted(collected, key=lambda item: item[0]) for r in calls]
    if accelerator.is_main_process:
        torch.save({"made_for": made_for, "calls": records}, path)
    return [TargetCall.from_record(r) for r in records]


def _train(transformer: torch.nn.Module, configs: list, members: list, targets: list[TargetCall],
           loop_settings: LoopSettings, settings: TrainingSettings, accelerator: Any, out: Path
           ) -> tuple[dict[int, Any], dict[str, Any]]:
    """Train `members` of the plan `configs` on `transformer`: ({index in configs: the trained config}
    (the main process's; the others' is empty), how the training went)."""
    plan_text = plan_summary(configs) + f" rank={settings.lora_rank} flops_weight={settings.flops_weight}"
    trained: dict[int, Any] = {}
    flags = {}
    # every process starts the trainables (LoRA's A, the routers) from the same draw, and each step
    # seeds its own noise (`Distillation.train_step`); the caller's random state is left as it was
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), apply(transformer, *configs) as handle:
        torch.manual_seed(loop_settings.seed)
        try:
            techniques = [t for t in handle.techniques if any(t.config is m for m in members)]
            trainables = [t.start_training(settings) for t in techniques]
            flags = {p: p.requires_grad for p in transformer.parameters()}
            learnt = {id(p) for t in trainables for p in t.parameters()}
            for parameter in transformer.parameters():
                parameter.requires_grad_(id(parameter) in learnt)
            targets = [t for t in targets if any(tr.learns_at(t.step_index, t.num_steps) for tr in trainables)]
            if not targets:
                raise ConfigError(f"{plan_text}: no step of these runs trains anything (every step runs dense)")
            loop = Distillation(transformer, trainables, targets, loop_settings, accelerator, out, plan_text,
                                flops_ratio=lambda: handle.report()["flops_ratio"])
            loop.resume()
            loop.run()
            details = {"training_steps": loop.step, "seconds": round(loop.seconds, 1),
                       "final_loss": sum(loop.losses[-20:]) / max(1, len(loop.losses[-20:])),
                       "batch_size": loop_settings.batch_size, "learning_rate": loop_settings.learning_rate,
                       "processes": accelerator.num_processes}
            if accelerator.is_main_process:
                for technique, trainable in zip(techniques, trainables):
                    index = next(i for i, c in enumerate(configs) if c is technique.config)
                    trained[index] = trainable.save(out, details)
            for trainable in trainables:
                trainable.stop()
        finally:
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)
    return trained, details


def finetune(pipe: Any, plan: Any, *, prompts: Sequence[str], out: str | Path, minutes: float | None = None,
             steps: int | None = None, batch_size: int = 8, learning_rate: float = 1e-3, lora_rank: int = 8,
             flops_weight: float = 1.0, checkpoint_every: int = 50, seed: int = 0, progress: bool = True,
             accelerator: Any = None, **call_kwargs: Any) -> Any:
    """Fine-tune what `plan` (a config or a list of them) can learn on `pipe` by self-distillation on
    `prompts` for `minutes` or `steps` (whichever ends first), into `out`; returns the plan (the same
    shape) with each trained config reading its file.

    `call_kwargs` go to the pipeline for the dense runs (`num_inference_steps`, `guidance_scale`,
    `height`, ...); `batch_size`: prompts per dense run and samples per training step; `lora_rank`:
    FlexDiT's adapters; `flops_weight`: DyDiT's FLOPs-ratio constraint in the loss. A plan with
    nothing to train is refused before any work."""
    configs = [plan] if not isinstance(plan, (list, tuple)) else list(plan)
    check_composable(configs)  # a non-config is refused here, by name
    members = trainable_members(configs)
    prompts = _check(pipe, prompts, minutes, steps, call_kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=next(pipe.transformer.parameters()).device.type == "cpu")
    transformer = pipe.transformer
    if next(transformer.parameters()).device != accelerator.device:
        pipe.to(accelerator.device)
    targets = _targets(pipe, prompts, call_kwargs, batch_size, seed, accelerator, out, progress)
    loop_settings = LoopSettings(steps, minutes, batch_size, learning_rate, checkpoint_every, seed, progress)
    trained, details = _train(transformer, configs, members, targets, loop_settings,
                              TrainingSettings(lora_rank=lora_rank, flops_weight=flops_weight), accelerator, out)
    details = {"prompts": len(prompts), **details, "call": {k: repr(v) for k, v in call_kwargs.items()}}
    result = [trained.get(i, config) for i, config in enumerate(configs)]
    if accelerator.is_main_process:
        save_plan(out / PLAN, result, pipe, num_inference_steps=call_kwargs.get("num_inference_steps"),
                  finetune=details)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result])[0]
    return result if isinstance(plan, (list, tuple)) else result[0]


__all__ = ["finetune", "trainable_members"]
