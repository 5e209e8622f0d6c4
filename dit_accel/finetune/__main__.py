"""`python -m dit_accel.finetune` / `accelerate launch -m dit_accel.finetune`: see `command.py`."""

import sys

from .command import main

sys.exit(main())
