"""`python -m watchdog`: the same as the `pg-watchdog` command."""

import sys

from watchdog.commands.cli import main

sys.exit(main())
