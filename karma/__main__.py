"""`python -m karma ...` (and `torchrun -m karma train ...`) run the CLI."""

import sys

from karma.cli import main

sys.exit(main())
