"""`python -m ria ...` is the `ria` command."""

import sys

from .cli import main

sys.exit(main())
