"""``python -m audioclf``: what torchrun launches (``torchrun --nproc_per_node=N -m audioclf train ...``)."""

import sys

from .cli import main

sys.exit(main())
