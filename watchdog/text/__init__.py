"""Text helpers at the bottom: escaping, fitting, quoting, redaction, timestamps, error lines."""
