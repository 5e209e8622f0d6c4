"""The model a plan file was made for, as a plan member: `apply` refuses another model by name.

A tuned plan's thresholds and ratios hold for one checkpoint at one step count. `load_plan` puts a
`ModelCheckConfig` first in the configs it returns, so that `apply(pipe, *load_plan(path))` checks
the transformer's identity (`models.identity`: class, config hash, weight fingerprint) before it
attaches anything, and the first transformer call of a run checks the step count, before any block
runs. It occupies no stage and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, ConfigError, Stage, param
from ..models.identity import identity_mismatch
from ..runtime.call_state import CallState
from ..runtime.registry import register_technique
from ..runtime.technique import Technique


IDENTITY_KEYS = ("model_class", "config_hash", "weights")


@dataclass(frozen=True)
class ModelCheckConfig(AccelerationConfig):
    """The transformers and step count a plan file holds for."""

    #: one "class|config hash|weights fingerprint" per transformer of the pipeline (Wan 2.2 has two)
    models: tuple[str, ...] = param((), "identities of the transformers the plan was made for "
                                        "(models.identity.model_identity, joined by |)")
    num_inference_steps: int | None = param(None, "the steps the plan was tuned for; None: any", low=1)
    source: str = param("", "the plan file, named in refusals")

    name = "model"

    def stages(self) -> frozenset[Stage]:
        return frozenset()

    @classmethod
    def keep_all(cls) -> "ModelCheckConfig":
        raise ConfigError("ModelCheckConfig comes from a plan file (dit_accel.load_plan); it has no keep-all")

    @classmethod
    def joined(cls, identity: dict[str, str]) -> str:
        return "|".join(identity[key] for key in IDENTITY_KEYS)

    def identities(self) -> list[dict[str, str]]:
        return [dict(zip(IDENTITY_KEYS, model.split("|"))) for model in self.models]


@register_technique(ModelCheckConfig, "the model and step count a plan file was made for (checked, changes nothing)",
                    plan_member=False)
class ModelCheck(Technique):
    def attach(self) -> None:
        mismatches = [identity_mismatch(identity, self.session.transformer) for identity in self.config.identities()]
        if None not in mismatches:
            mismatch = mismatches[0] if mismatches else "it names no model"
            raise ConfigError(f"plan {self.config.source or '(file)'} does not fit this model: {mismatch}; "
                              "tune a plan for it (dit-accel tune)")

    def begin_call(self, call_state: CallState) -> None:
        steps, tuned = call_state.ctx.requested_steps or call_state.ctx.num_steps, self.config.num_inference_steps
        if tuned is not None and steps is not None and steps != tuned:
            raise ConfigError(f"plan {self.config.source or '(file)'} was tuned for {tuned} steps; this call runs "
                              f"{steps} (tune it again for {steps}, or call with num_inference_steps={tuned})")
