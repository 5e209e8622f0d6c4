"""`python -m dit_accel.bench` (what `accelerate launch -m dit_accel.bench` runs) is `dit-accel bench`."""

import sys

from .options import main

sys.exit(main())
