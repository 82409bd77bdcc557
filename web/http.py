"""Reading a request, shared by the blueprints: the body under its size limit, JSON that says
what is wrong with it, the CSRF check of a form post, the posted fields of an admin action."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, current_app, jsonify, redirect, request
from flask_wtf.csrf import CSRFError, validate_csrf
from pydantic import BaseModel
from werkzeug.exceptions import RequestEntityTooLarge
from wtforms import ValidationError as CsrfInvalid

from web.errors import ApiError

# Deeper than any body of the contract needs, and well inside what the parser can take (Python's
# json recurses once a level).
MAX_DEPTH = 512
FORM_TYPES = ("", "application/x-www-form-urlencoded", "multipart/form-data")


class TooLongNumber:
    """A JSON integer too long for Python to convert (over 4300 digits): kept as a value that
    fails validation, so the answer is a 422 naming the field instead of a malformed body."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"<integer of {len(self.text)} digits>"


def read_body() -> bytes:
    """The body, cached for the parsers; 413 past MAX_CONTENT_LENGTH, with or without a
    Content-Length, whatever the content type (the contract checks size first)."""
    data = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # Werkzeug stops a streamed (chunked) body at the limit without an error
    # (LimitedStream.readall): one more byte from the server's stream tells a body of exactly
    # the limit from a longer one.
    at_limit = request.content_length is None and limit is not None and len(data) >= limit
    if at_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int | TooLongNumber:
    try:
        return int(text)
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        return TooLongNumber(text)


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return result


def _nesting(text: str) -> tuple[int, bool]:
    """(deepest nesting of arrays and objects, whether the brackets pair up), outside strings;
    iterative, so any depth is measured without recursion."""
    depth = deepest = 0
    stack: list[str] = []
    in_string = escaped = False
    closing = {"]": "[", "}": "{"}
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append(ch)
            depth += 1
            deepest = max(deepest, depth)
        elif ch in closing:
            if not stack or stack.pop() != closing[ch]:
                return deepest, False
            depth -= 1
    return deepest, not stack and not in_string


def _too_deep() -> ApiError:
    return ApiError(
        400,
        "json_too_deep",
        f"the JSON nests arrays and objects more than {MAX_DEPTH} levels deep",
        {"max_depth": MAX_DEPTH},
    )


def json_body() -> Any:
    """The body as JSON: 400 ``malformed_json`` when it is not JSON, 400 ``duplicate_key`` for
    an object with a key twice (naming it), 400 ``json_too_deep`` past MAX_DEPTH levels."""
    malformed = ApiError(400, "malformed_json", "the body is not valid JSON")
    try:
        # Strict UTF-8 (RFC 8259), a leading BOM tolerated: json.loads(bytes) would also take
        # UTF-16/32 and decode encoded surrogates ("surrogatepass").
        text = read_body().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise malformed from exc
    # Counting brackets is fast; the exact (slower) scan runs only when the count could be deep.
    if text.count("[") + text.count("{") > MAX_DEPTH:
        deepest, paired = _nesting(text)
        if not paired:
            raise malformed
        if deepest > MAX_DEPTH:
            raise _too_deep()
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_int=_parse_int, object_pairs_hook=_object
        )
    except DuplicateKey as exc:
        raise ApiError(
            400,
            "duplicate_key",
            f"the key {exc.key!r} appears twice in one object",
            {"key": exc.key},
        ) from exc
    except RecursionError as exc:  # a deep body on an already deep stack
        raise _too_deep() from exc
    except ValueError as exc:
        raise malformed from exc


def check_csrf() -> None:
    try:
        validate_csrf(request.form.get("csrf_token"))
    except (CsrfInvalid, CSRFError) as exc:
        raise ApiError(400, "csrf_failed", "the form's CSRF token is missing or invalid") from exc


def is_json() -> bool:
    return request.mimetype == "application/json"


def posted_fields(form_only: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> Any:
    """An admin action's fields: JSON as sent, or a form whose CSRF token checks out.

    A body-less post is what a cross-site page can send without a preflight: a form's rules.
    A form's ``csrf_token`` and the ``form_only`` fields (page state) are not part of the body
    model; ``lists`` are fields a form repeats.
    """
    if is_json():
        data = json_body()
        if not isinstance(data, dict):
            raise ApiError(400, "malformed_json", "the body must be a JSON object")
        return data
    if request.mimetype in FORM_TYPES:
        read_body()
        check_csrf()
        fields: dict[str, Any] = {
            name: request.form.getlist(name) if name in lists else request.form[name]
            for name in request.form
            if name != "csrf_token" and name not in form_only
        }
        return fields
    raise ApiError(415, "unsupported_media_type", "send JSON or a form with its CSRF token")


def accepted(result: BaseModel, back: str) -> Response:
    """A state-changing admin route's answer: 202 and the result to a JSON post, 303 back to the
    page to a form post."""
    from web.schemas import dump

    if is_json():
        response = jsonify(dump(result))
        response.status_code = 202
        return response
    return redirect(back, code=303)  # type: ignore[return-value]
