"""What on-call people hear: Sentry events and check-ins, pooler events, Prometheus metrics."""
