"""The processes running one benchmark: one in a plain run, several under `accelerate launch` (batch i
on rank i % processes); each process's sums, and their merge into the table one process would give."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .rows import Row


@dataclasses.dataclass(frozen=True)
class Processes:
    """The processes running the benchmark: one in a plain run; under `accelerate launch`, the launched
    ones (torch.distributed through accelerate: gloo on CPUs). Batch i runs on rank i % world."""

    rank: int = 0
    world: int = 1
    #: the device accelerate gives this process (cuda:<local rank> under a multi-GPU launch)
    device: str | None = None

    @classmethod
    def current(cls, device: str = "cpu") -> Processes:
        """This process among the launched ones. For a CPU `device` accelerate is told so (else a process
        launched by torchrun on a machine without a GPU counts as a plain one): gloo between the processes."""
        from accelerate import PartialState

        state = PartialState(cpu=torch.device(device).type == "cpu")
        return cls(state.process_index, state.num_processes, str(state.device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """The indices of this process's batches out of `count` (none when there are more processes)."""
        return list(range(self.rank, count, self.world))

    def device_for(self, device: str) -> str:
        """`--device` for this process: a bare "cuda" becomes the launched process's own GPU."""
        ours = torch.device(self.device or "cpu")
        asked = torch.device(device)
        return str(ours) if self.world > 1 and asked.type == ours.type != "cpu" and asked.index is None else device

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every process (every process must call it, at the same point)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, by rank, on every process."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])


ONE_PROCESS = Processes()
#: what a process measured of a row, summed over its batches (`partials`, `merge_rows`)
PARTIAL_FIELDS = ("error", "samples", "seconds", "transformer_seconds", "flops", "dense_flops", "peak_bytes",
                  "psnr_frames", "ssim_sum", "perceptual_sum", "accuracy_sum", "agreeing_readings", "judge_readings",
                  "features", "fid_features", "clip_sum", "clip_frames")
#: what adds up across processes, and the feature lists that go back in batch order
SUMMED = ("samples", "seconds", "ssim_sum", "perceptual_sum", "accuracy_sum", "agreeing_readings", "judge_readings",
          "clip_sum", "clip_frames")
FEATURES = ("features", "fid_features")


def partials(rows: list[Row], indices: list[int]) -> dict[str, Any]:
    """This process's sums of every row and the batches they are over (`indices`), to gather."""
    return {"batches": indices,
            "rows": [{**{key: getattr(row, key) for key in PARTIAL_FIELDS},
                      **{key: [f.detach().cpu() for f in getattr(row, key)] for key in FEATURES}} for row in rows]}


def merge_rows(rows: list[Row], parts: list[dict[str, Any]]) -> None:
    """Every process's `partials` (by rank) into `rows`: the totals one process running every batch would
    have. Times, samples, FLOPs and score sums add up (the ledger's are None where a process's are: a row
    without a handle); the peak memory is the largest; the PSNR frames are all of them (their mean does not
    depend on their order); the judge's and Inception features go back in batch order; a row that failed in any process
    failed (the lowest rank's error). Labels, steps and configs are the same in every process already."""
    for position, row in enumerate(rows):
        ours = [part["rows"][position] for part in parts]
        row.error = next((p["error"] for p in ours if p["error"] is not None), None)
        for key in SUMMED:
            setattr(row, key, sum(p[key] for p in ours))
        for key in ("transformer_seconds", "flops", "dense_flops"):
            values = [p[key] for p in ours]
            setattr(row, key, None if any(v is None for v in values) else sum(values))
        peaks = [p["peak_bytes"] for p in ours if p["peak_bytes"] is not None]
        row.peak_bytes = max(peaks) if peaks else None
        row.psnr_frames = [value for p in ours for value in p["psnr_frames"]]
        for key in FEATURES:
            by_batch = sorted(((index, features) for part, p in zip(parts, ours)
                               for index, features in zip(part["batches"], p[key])), key=lambda pair: pair[0])
            setattr(row, key, [features for _, features in by_batch])
