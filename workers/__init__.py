"""The participants: one Celery worker process per service, each consuming its own queue."""
