import sys

from llamafleet.bench.run import main

sys.exit(main())
