"""``python -m llamafleet``: the command line (same as ``llamafleet``)."""

import sys

from llamafleet.cli import main

sys.exit(main())
