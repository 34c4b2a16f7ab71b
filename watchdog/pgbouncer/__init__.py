"""pgbouncer"""
