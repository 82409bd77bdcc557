# One image for every process of the system; docker-compose.yml picks the command (`sagactl ...`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The package metadata first: dependencies stay cached while only the code changes.
COPY setup.cfg pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY models ./models
COPY migrations ./migrations
COPY web ./web
RUN pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin saga \
    && mkdir -p /var/lib/saga && chown saga:saga /var/lib/saga

USER saga
# Beat's schedule file and any development secrets live here, never in the code directory.
# The web binds every interface in a container (its port is published); loopback is the default.
ENV SAGA_STATE_DIR=/var/lib/saga \
    SAGA_WEB_HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000
# Run from outside /app, so the installed package (not the copied source) is what runs.
WORKDIR /home/saga
CMD ["sagactl", "web"]
