"""pg-watchdog: a self-healing watchdog for PostgreSQL connection exhaustion."""

__version__ = "0.1.0"
