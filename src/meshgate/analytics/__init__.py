"""Usage analytics in the control plane: ingest of the gateways' batches, roll-ups by
minute, hour, day and month with retention, the analytics API, and usage alerts."""
