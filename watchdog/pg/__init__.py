"""Every round trip to PostgreSQL: the SQL, connecting, the snapshot, signalling, catalog reads."""
