"""`python -m everyseg ...`, so that `torchrun -m everyseg train ...` starts the CLI."""

import sys

from everyseg.cli import main

sys.exit(main())
