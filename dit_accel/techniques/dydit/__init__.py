"""DyDiT dynamic width (TDW) and token skipping (SDT) (after DyDiT, arXiv 2410.03456, and DyDiT++, arXiv
2504.06803): training-free by default (the choices come from calibration or the weights), or run by
routers learned in a short fine-tune (`routers`).

TDW (stage 4): the steps fall into `buckets` equal parts; in each, every block keeps its most
important attention heads and MLP channel groups (one group per head, as in DyDiT), fewer at the
noisy steps. The block really runs narrower: the q/k/v rows and output columns of the kept heads and
the MLP rows and columns of the kept groups are index-selected once per bucket (only the running
bucket's slices are held; a linear whose units all stay runs on its own weights, uncopied) and the
model's own weights are never written. Where a normalisation spans
all heads (Wan's `norm_q`/`norm_k`), q and k are projected at full width, normalised, then sliced.
The widths depend only on the step, so CFG branches and batches run the same heads.

Which heads and groups: a calibration file (`dit_accel.calibrate` / `dit-accel calibrate`: per
bucket, the Gram matrix of the heads' (groups') contributions to the block output, x_h W_out[:, h],
over the calibration prompts; made for one checkpoint and refused for any other) from which the
units whose dropping changes the block output least are dropped greedily, cancellations between
units included; or without one a data-free default: units ranked by the product of the norms of
their input rows and output columns, the same at every step.

Learned routers (`DyDiTConfig(routers=FILE)`, made by `dit_accel.finetune(pipe, DyDiTConfig(...), ...)` /
`dit-accel finetune`; `routers.py`): DyDiT's own. A timestep router (the call's timestep, a fixed
sinusoidal embedding, a small MLP shared by the blocks, one logit per head and channel group) picks
each step's units on the CPU, run sliced as above (a handful of distinct selections per run); a
token router per token-wise MLP sends the top `token_ratio` of the tokens per sample by its score
through the MLP, the others get no MLP update (the residual alone); routers trained at token_ratio 1
leave token skipping to the cache below, at any token_ratio. A low-rank correction per output linear
adds back what the dropped units gave. The fine-tune trains them by self-distillation at full width
with straight-through Gumbel-sigmoid masks on the heads' and groups' outputs and on the MLP outputs,
plus DyDiT's FLOPs-ratio constraint toward the config's mean width. A file is made for one
checkpoint and one config, and refused for any other.

SDT without routers: in each block with a token-wise MLP, only the `token_ratio` of tokens per sample whose MLP input
changed most since they were last computed run the MLP (gathered, run, scattered back: static
shapes); the others reuse their cached MLP output. How far an input moved is read off a 64-wide
random sketch of it, so the cache holds the sketches and the outputs (on the device, in fp8 or in
host memory: `token_cache`), not the inputs. The first call of every branch computes every token; at
token_ratio 1 nothing is hooked.

The package, by job: `config` (the config, its buckets and what `tune` tries), `calibration` (the
scores, their files, the choice of units, the calibration run), `width` (what a block can narrow and
the slicing hooks), `tokens` (MLP token skipping), `routers` (the learned routers, their file and
their training) and `technique` (the registered technique).
"""

from .calibration import CALIBRATION_FORMAT, DyDiTScores, calibrate, load_calibration, save_calibration, select_units
from .config import DyDiTConfig, kept_count
from .routers import ROUTERS_FORMAT, Routers, load_routers, save_routers
from .technique import DyDiT

__all__ = ["CALIBRATION_FORMAT", "ROUTERS_FORMAT", "DyDiT", "DyDiTConfig", "DyDiTScores", "Routers", "calibrate",
           "kept_count", "load_calibration", "load_routers", "save_calibration", "save_routers", "select_units"]
