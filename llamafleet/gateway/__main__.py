"""``python -m llamafleet.gateway``: the gateway process the supervisor starts."""

import sys

from llamafleet.gateway.server import main

sys.exit(main())
