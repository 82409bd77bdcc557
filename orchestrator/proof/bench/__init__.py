"""``sagactl bench``: saga throughput and latency against raw Celery baselines."""
