"""The admin console: saga lists, one saga's story, operator actions, dead letters.

HTTP Basic on every route. A state-changing route takes a JSON post (a browser cannot send one
cross-site without a preflight, which this app never answers) or a form post with a CSRF token.
"""

from __future__ import annotations

import contextlib
import hmac
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy.orm import Session

from models.db import transaction
from models.deadletters import DeadLetter
from models.orders import Order
from orchestrator import queries, registry
from orchestrator.kernel import engine
from orchestrator.kernel.machine import NotApplicable
from orchestrator.messaging import deadletters
from web import presenters
from web.errors import ApiError, wants_json
from web.orders import check_csrf

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.add_app_template_filter(presenters.elapsed, "elapsed")

MAX_NOTE = 500
MAX_BULK = 200


def _authorized() -> str | None:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return None
    user_ok = hmac.compare_digest(
        (auth.username or "").encode(), current_app.config["ADMIN_USER"].encode()
    )
    password_ok = hmac.compare_digest(
        (auth.password or "").encode(), current_app.config["ADMIN_PASSWORD"].encode()
    )
    return auth.username if user_ok and password_ok else None


@bp.before_request
def _require_admin() -> None:
    user = _authorized()
    if user is None:
        raise ApiError(
            401,
            "unauthorized",
            "admin credentials required",
            headers={"WWW-Authenticate": 'Basic realm="saga admin", charset="UTF-8"'},
        )
    g.admin_user = user


def _action_body() -> dict[str, Any]:
    """The posted fields: JSON as is, or a form whose CSRF token checks out."""
    if request.mimetype == "application/json":
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ApiError(400, "malformed_json", "the body must be a JSON object")
        return data
    # A body-less post is what a cross-site page can send without a preflight: a form's rules.
    if request.mimetype in ("", "application/x-www-form-urlencoded", "multipart/form-data"):
        check_csrf()
        return request.form.to_dict()
    raise ApiError(415, "unsupported_media_type", "send JSON or a form with its CSRF token")


def _note(body: dict[str, Any]) -> str | None:
    note = body.get("note")
    if note is None or note == "":
        return None
    if not isinstance(note, str) or len(note) > MAX_NOTE or "\x00" in note:
        raise ApiError(
            422,
            "validation_failed",
            "invalid note",
            [{"field": "note", "message": f"a text of at most {MAX_NOTE} characters"}],
        )
    return note


def _uuid_or_404(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise ApiError(404, "not_found", "no such saga") from exc


@bp.get("")
@bp.get("/")
def index() -> Response:
    return redirect(url_for("admin.sagas"))  # type: ignore[return-value]


@bp.get("/sagas")
def sagas() -> Response | str:
    state = request.args.get("state") or None
    if state is not None and state not in queries.STATES:
        raise ApiError(400, "invalid_state", f"state must be one of {', '.join(queries.STATES)}")
    q = (request.args.get("q") or "").strip() or None
    definition = request.args.get("definition") or None
    if definition is not None and definition not in registry.current().names:
        raise ApiError(400, "invalid_definition",
                       f"definition must be one of {', '.join(registry.current().names)}")
    cursor = None
    if request.args.get("cursor"):
        try:
            cursor = queries.Cursor.decode(request.args["cursor"])
        except ValueError as exc:
            raise ApiError(400, "invalid_cursor", "the cursor is not valid") from exc
    with transaction() as session:
        items, next_cursor = queries.list_sagas(session, state, q, cursor, definition)
        counts = queries.counts(session)
        customers = _customers(session, items) if not wants_json() else {}
    next_token = next_cursor.encode() if next_cursor else None
    if wants_json():
        return jsonify({"sagas": items, "counts": counts, "next": next_token})
    return render_template(
        "admin/sagas.html",
        sagas=items,
        counts=counts,
        state=state,
        q=q or "",
        definition=definition or "",
        definitions=registry.current().names,
        next=next_token,
        paged=cursor is not None,
        states=queries.STATES,
        customers=customers,
    )


def _customers(session: Session, items: list[dict[str, Any]]) -> dict[str, str]:
    """Order id -> customer id, for the HTML list (one indexed lookup for the page)."""
    ids = []
    for item in items:
        with contextlib.suppress(ValueError):  # a saga of another kind is about no order
            ids.append(uuid.UUID(item["order_id"]))
    rows = session.execute(sa.select(Order.id, Order.customer_id).where(Order.id.in_(ids)))
    return {str(order_id): customer for order_id, customer in rows}


def _letters_of(session: Session, saga_id: uuid.UUID) -> list[dict[str, Any]]:
    """The saga's dead letters (index on saga_id), bodies masked for people."""
    rows = session.scalars(
        sa.select(DeadLetter).where(DeadLetter.saga_id == saga_id).order_by(DeadLetter.id.desc())
    )
    return [_letter_view(d) for d in rows]


def _letter_view(d: DeadLetter) -> dict[str, Any]:
    return deadletters.as_dict(d, with_body=True)


@bp.get("/sagas/<saga_id>")
def saga(saga_id: str) -> Response | str:
    ident = _uuid_or_404(saga_id)
    with transaction() as session:
        view = queries.saga_detail(session, ident)
        letters = _letters_of(session, ident) if view and not wants_json() else []
    if view is None:
        raise ApiError(404, "not_found", "no such saga")
    if wants_json():
        return jsonify(view)
    return render_template(
        "admin/saga.html",
        saga=view,
        letters=letters,
        now=engine.utcnow().isoformat(),
        can_retry=view["state"] == "failed" or view["stuck"],
        can_compensate=view["state"] == "running",
        reason_text=presenters.REASON_TEXT.get(view["reason"] or "", ""),
    )


def _act(saga_id: uuid.UUID, action: str, note: str | None) -> tuple[int, str | None]:
    try:
        with transaction() as session:
            state = engine.operator_action(session, saga_id, action, g.admin_user, note)
        return 202, state.value
    except engine.SagaNotFound:
        return 404, None
    except NotApplicable:
        return 409, None


def _action_route(action: str) -> Callable[[str], Response]:
    def view(saga_id: str) -> Response:
        ident = _uuid_or_404(saga_id)
        body = _action_body()
        status, state = _act(ident, action, _note(body))
        if status == 404:
            raise ApiError(404, "not_found", "no such saga")
        if status == 409:
            raise ApiError(409, "not_applicable", f"{action} does not apply to this saga now")
        if request.mimetype == "application/json":
            response = jsonify({"saga_id": str(ident), "state": state})
            response.status_code = 202
            return response
        return redirect(url_for("admin.saga", saga_id=str(ident)), code=303)  # type: ignore[return-value]

    view.__name__ = f"saga_{action}"
    return view


bp.add_url_rule("/sagas/<saga_id>/retry", view_func=_action_route("retry"), methods=["POST"])
bp.add_url_rule(
    "/sagas/<saga_id>/compensate", view_func=_action_route("compensate"), methods=["POST"]
)


@bp.post("/sagas/bulk")
def bulk() -> Response:
    body = _action_body()
    action = body.get("action")
    if action not in ("retry", "compensate"):
        raise ApiError(
            422,
            "validation_failed",
            "invalid action",
            [{"field": "action", "message": "must be retry or compensate"}],
        )
    ids = body.get("saga_ids")
    if request.mimetype != "application/json":
        ids = request.form.getlist("saga_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > MAX_BULK
        or not all(isinstance(i, str) for i in ids)
    ):
        raise ApiError(
            422,
            "validation_failed",
            "invalid saga_ids",
            [{"field": "saga_ids", "message": f"a list of 1 to {MAX_BULK} ids"}],
        )
    note = _note(body)
    results = []
    for raw in ids:
        try:
            status, _ = _act(uuid.UUID(raw), action, note)
        except ValueError:
            status = 404
        results.append({"saga_id": raw, "status": status})
    if request.mimetype != "application/json":
        return redirect(
            url_for("admin.sagas", state=request.form.get("return_state") or None), code=303
        )  # type: ignore[return-value]
    return jsonify({"results": results})


@bp.get("/dead-letters")
def dead_letters() -> Response | str:
    with transaction() as session:
        items = [_letter_view(d) for d in deadletters.list_letters(session)]
    if wants_json():
        return jsonify({"dead_letters": items})
    return render_template("admin/dead_letters.html", letters=items)


def _letter_route(verb: str, act: Callable[[int, str], None]) -> Callable[[int], Response]:
    def view(letter_id: int) -> Response:
        _action_body()
        try:
            act(letter_id, g.admin_user)
        except deadletters.DeadLetterNotFound as exc:
            raise ApiError(404, "not_found", "no such dead letter") from exc
        except deadletters.DeadLetterResolved as exc:
            raise ApiError(409, "not_applicable", str(exc)) from exc
        if request.mimetype == "application/json":
            response = jsonify({"id": letter_id, "state": verb})
            response.status_code = 202
            return response
        return redirect(url_for("admin.dead_letters"), code=303)  # type: ignore[return-value]

    view.__name__ = f"dead_letter_{verb}"
    return view


bp.add_url_rule(
    "/dead-letters/<int:letter_id>/replay",
    view_func=_letter_route("replayed", deadletters.replay),
    methods=["POST"],
)
bp.add_url_rule(
    "/dead-letters/<int:letter_id>/discard",
    view_func=_letter_route("discarded", deadletters.discard),
    methods=["POST"],
)
