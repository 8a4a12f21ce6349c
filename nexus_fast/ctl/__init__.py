"""nexusctl: the operator's command line for a nexus_fast server (gRPC ControlService).

``cli`` builds the commands (click), ``client`` speaks gRPC and turns errors into exit
codes, ``render`` prints tables, JSON and YAML, ``config`` reads contexts.
"""

from nexus_fast.ctl.cli import cli, main

__all__ = ["cli", "main"]
