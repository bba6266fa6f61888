"""`python -m selfablate` (what torchrun runs): the CLI."""

import sys

from .cli import main

sys.exit(main())
