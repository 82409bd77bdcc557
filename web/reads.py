"""A read whose database connection died in use is run once more, on a fresh connection.

The web pings a pooled connection only after it sat idle (models/db.py ``ping_when_idle``), so a
backend that dies while its connection is in steady use (a database restart, a terminated
session) is found by the request that uses it next. A GET or HEAD changes nothing, so running it
again is safe: the pool has been invalidated by then (SQLAlchemy replaces every connection older
than the disconnect), and the user sees the page instead of a 503. A write is not rerun here: its
client retries it with its Idempotency-Key, as the contract says.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, request
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD"})


class RerunsReads(Flask):
    def dispatch_request(self) -> Any:
        try:
            return super().dispatch_request()
        except DBAPIError as exc:
            if request.method not in SAFE_METHODS or not exc.connection_invalidated:
                raise
            log.warning("a read lost its database connection (%s); running it again", exc.orig)
            return super().dispatch_request()
