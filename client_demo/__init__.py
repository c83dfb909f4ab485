"""Demo clients: a streaming CLI client and a load generator (no torch needed)."""
