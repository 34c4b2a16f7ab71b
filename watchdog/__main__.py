"""`python -m watchdog`: the same as the `pg-watchdog` command."""

import sys

from watchdog.cli import main

sys.exit(main())
