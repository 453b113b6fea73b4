"""Edge gateway: broker, ingest and validation, store, chain relay, aggregation, round controller (DESIGN §6)."""
