"""`python -m dit_accel generate ...`: the same command as `dit-accel`."""

from .cli import main

raise SystemExit(main())
