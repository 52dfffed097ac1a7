"""``python -m llamafleet.worker``: run one worker process (started by the supervisor)."""

import sys

from llamafleet.worker.server import main

sys.exit(main())
