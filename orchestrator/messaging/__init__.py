"""Celery app, topology, envelopes, the outbox and its publishers, dead letters."""
