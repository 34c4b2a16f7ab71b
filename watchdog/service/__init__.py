"""`pg-watchdog run`: sweeps, the held connection per target, the scheduler, systemd."""
