"""DyDiT dynamic width (TDW) and token skipping (SDT), training-free (after DyDiT, arXiv 2410.03456,
and DyDiT++, arXiv 2504.06803, which fine-tune routers; here the choices come from calibration).

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

SDT: in each block with a token-wise MLP, only the `token_ratio` of tokens per sample whose MLP input
changed most since they were last computed run the MLP (gathered, run, scattered back: static
shapes); the others reuse their cached MLP output. How far an input moved is read off a 64-wide
random sketch of it, so the cache holds the sketches and the outputs (on the device, in fp8 or in
host memory: `token_cache`), not the inputs. The first call of every branch computes every token; at
token_ratio 1 nothing is hooked.

The package, by job: `config` (the config, its buckets and what `tune` tries), `calibration` (the
scores, their files, the choice of units, the calibration run), `width` (what a block can narrow and
the slicing hooks), `tokens` (MLP token skipping) and `technique` (the registered technique).
"""

from .calibration import CALIBRATION_FORMAT, DyDiTScores, calibrate, load_calibration, save_calibration, select_units
from .config import DyDiTConfig, kept_count
from .technique import DyDiT

__all__ = ["CALIBRATION_FORMAT", "DyDiT", "DyDiTConfig", "DyDiTScores", "calibrate", "kept_count", "load_calibration",
           "save_calibration", "select_units"]
