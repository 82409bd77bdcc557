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
from pydantic import TypeAdapter, ValidationError
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
from web.http import accepted, is_json, posted_fields
from web.schemas import (
    ActionIn,
    ActionResult,
    BulkIn,
    BulkItemResult,
    BulkResult,
    DeadLetterList,
    DeadLetterOut,
    LetterActionIn,
    LetterActionResult,
    LetterId,
    SagaDetail,
    SagaList,
    SagaListQuery,
    dump,
)
from web.validation import Invalid, validate

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.add_app_template_filter(presenters.elapsed, "elapsed")


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
def require_admin() -> None:
    user = _authorized()
    if user is None:
        raise ApiError(
            401,
            "unauthorized",
            "admin credentials required",
            headers={"WWW-Authenticate": 'Basic realm="saga admin", charset="UTF-8"'},
        )
    g.admin_user = user


def _invalid(exc: Invalid, what: str) -> ApiError:
    return ApiError(422, "validation_failed", f"the {what} is not valid", exc.details)


def _saga_id_or_404(value: str) -> uuid.UUID:
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
    try:
        query = validate(SagaListQuery, request.args.to_dict())
    except Invalid as exc:
        if any(d["field"] == "state" for d in exc.details):
            raise ApiError(
                400, "invalid_state", f"state must be one of {', '.join(queries.STATES)}"
            ) from exc
        raise ApiError(400, "invalid_query", "the query is not valid", exc.details) from exc
    state = query.state
    q = (query.q or "").strip() or None
    definition = query.definition
    if definition is not None and definition not in registry.current().names:
        raise ApiError(
            400,
            "invalid_definition",
            f"definition must be one of {', '.join(registry.current().names)}",
        )
    cursor = None
    if query.cursor:
        try:
            cursor = queries.Cursor.decode(query.cursor)
        except ValueError as exc:
            raise ApiError(400, "invalid_cursor", "the cursor is not valid") from exc
    with transaction() as session:
        held = None if query.held is None else query.held == "true"
        items, next_cursor = queries.list_sagas(session, state, q, cursor, definition, held)
        counts = queries.counts(session)
        customers = _customers(session, items) if not wants_json() else {}
    next_token = next_cursor.encode() if next_cursor else None
    listed = dump(SagaList.model_validate({"sagas": items, "counts": counts, "next": next_token}))
    if wants_json():
        return jsonify(listed)
    return render_template(
        "admin/sagas.html",
        sagas=listed["sagas"],
        counts=listed["counts"],
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
    return dump(DeadLetterOut.model_validate(deadletters.as_dict(d, with_body=True)))


@bp.get("/sagas/<saga_id>")
def saga(saga_id: str) -> Response | str:
    ident = _saga_id_or_404(saga_id)
    with transaction() as session:
        view = queries.saga_detail(session, ident)
        letters = _letters_of(session, ident) if view and not wants_json() else []
    if view is None:
        raise ApiError(404, "not_found", "no such saga")
    view = dump(SagaDetail.model_validate(view))
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
        ident = _saga_id_or_404(saga_id)
        try:
            body = validate(ActionIn, posted_fields())
        except Invalid as exc:
            raise _invalid(exc, "action") from exc
        status, state = _act(ident, action, body.note)
        if status == 404:
            raise ApiError(404, "not_found", "no such saga")
        if status == 409:
            raise ApiError(409, "not_applicable", f"{action} does not apply to this saga now")
        if is_json():
            response = jsonify(dump(ActionResult(saga_id=ident, state=state)))  # type: ignore[arg-type]
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
    try:
        body = validate(BulkIn, posted_fields(form_only=("return_state",), lists=("saga_ids",)))
    except Invalid as exc:
        raise _invalid(exc, "bulk request") from exc
    results = []
    for raw in body.saga_ids:
        try:
            ident = uuid.UUID(raw)
        except ValueError:
            status = 404  # not an id: no such saga
        else:
            status, _ = _act(ident, body.action, body.note)
        results.append(BulkItemResult(saga_id=raw, status=status))  # type: ignore[arg-type]
    if not is_json():
        return redirect(
            url_for("admin.sagas", state=request.form.get("return_state") or None), code=303
        )  # type: ignore[return-value]
    return jsonify(dump(BulkResult(results=results)))


@bp.get("/dead-letters")
def dead_letters() -> Response | str:
    with transaction() as session:
        items = [_letter_view(d) for d in deadletters.list_letters(session)]
    if wants_json():
        return jsonify(dump(DeadLetterList.model_validate({"dead_letters": items})))
    return render_template("admin/dead_letters.html", letters=items)


_LETTER_ID: TypeAdapter[int] = TypeAdapter(LetterId)


def _letter_route(verb: str, act: Callable[[int, str], None]) -> Callable[[int], Response]:
    def view(letter_id: int) -> Response:
        try:
            _LETTER_ID.validate_python(letter_id)
        except ValidationError as exc:  # past the bigint range: no such letter can exist
            raise ApiError(404, "not_found", "no such dead letter") from exc
        try:
            validate(LetterActionIn, posted_fields())
        except Invalid as exc:
            raise _invalid(exc, "request") from exc
        try:
            act(letter_id, g.admin_user)
        except deadletters.DeadLetterNotFound as exc:
            raise ApiError(404, "not_found", "no such dead letter") from exc
        except deadletters.DeadLetterResolved as exc:
            raise ApiError(409, "not_applicable", str(exc)) from exc
        result = LetterActionResult(id=letter_id, state=verb)  # type: ignore[arg-type]
        return accepted(result, url_for("admin.dead_letters"))

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
