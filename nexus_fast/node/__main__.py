"""``python -m nexus_fast.node``: the same as ``nexus-node``."""

import sys

from nexus_fast.node.cli import main

sys.exit(main())
