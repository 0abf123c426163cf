"""``python -m tasker_core``: the tasker-py command line (see :mod:`tasker_core.cli`)."""

import sys

from tasker_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
