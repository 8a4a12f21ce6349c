"""Launcher for profiling: ``scalene run profiling/serve.py --- <nexus-fast flags>``.

scalene profiles a script, and ``nexus_fast/cli.py`` cannot be run as one: its directory
would go first on ``sys.path`` and ``nexus_fast/queue.py`` would shadow the standard
library's ``queue``. This file only calls the real entry point.
"""

import sys

from nexus_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
