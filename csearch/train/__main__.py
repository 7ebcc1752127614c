"""`python -m csearch.train classifier ...` (see csearch.train.cli)."""

import sys

from .cli import main

sys.exit(main())
