"""Headers that keep a browser safe with this app: relative redirects whatever the Host says."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from flask import Flask, Response

# Browsers read "//host" and "/\host" as another site: a relative Location starts with one slash.
_LEADING_SLASHES = re.compile(r"^[/\\]+")


def relative(location: str) -> str:
    """``location`` without scheme and host, never starting with two slashes."""
    parts = urlsplit(location)
    path = _LEADING_SLASHES.sub("/", parts.path) or "/"
    return urlunsplit(("", "", path, parts.query, parts.fragment))


def register(app: Flask) -> None:
    @app.after_request
    def _relative_redirects(response: Response) -> Response:
        # Werkzeug's own redirects (merged slashes, a missing trailing slash) are absolute,
        # built from the request's Host header: an attacker's Host would become the target.
        location = response.headers.get("Location")
        if location is not None:
            response.headers["Location"] = relative(location)
        return response
