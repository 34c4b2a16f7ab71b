"""PgBouncer's admin console: bounded reads, checked rows, held connections, `check`."""
