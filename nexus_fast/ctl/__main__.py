"""``python -m nexus_fast.ctl``: the same as the ``nexusctl`` console script."""

from nexus_fast.ctl.cli import main

main()
