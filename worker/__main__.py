"""``python -m worker``: run one worker process (started by the supervisor)."""

import sys

from worker.server import main

sys.exit(main())
