"""What the services say about themselves: logs (and, beside them, traces and records)."""
