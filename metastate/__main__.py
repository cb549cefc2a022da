"""`python -m metastate ...`, e.g. under torchrun: `torchrun --nproc-per-node 8 -m metastate train ...`."""

import sys

from metastate.cli import main

sys.exit(main())
