"""The admin console: saga lists, one saga's story, operator actions (one by one, by ids, or by
filter as a recorded bulk operation), the operations, dead letters.

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
from models.enums import Reason
from models.orders import Order
from orchestrator import queries, registry
from orchestrator.kernel import engine, operations
from orchestrator.messaging import deadletters
from web import presenters
from web.errors import ApiError, wants_json
from web.http import accepted, is_json, posted_fields
from web.schemas import (
    ActionIn,
    ActionResult,
    BulkItemResult,
    BulkPreview,
    BulkResult,
    DeadLetterList,
    DeadLetterOut,
    LetterActionIn,
    LetterActionResult,
    LetterId,
    OperationAccepted,
    OperationDetail,
    OperationList,
    SagaDetail,
    SagaList,
    SagaListQuery,
    dump,
)
from web.validation import (
    FILTER_FIELDS,
    Invalid,
    filter_problems,
    parse_bulk,
    saga_filter,
    step_names,
    validate,
)

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


def _id_or_404(value: str, what: str = "saga") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise ApiError(404, "not_found", f"no such {what}") from exc


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
    problems = filter_problems(query)
    if any(p["field"] == "definition" for p in problems):
        raise ApiError(
            400,
            "invalid_definition",
            f"definition must be one of {', '.join(registry.current().names)}",
        )
    if problems:
        raise ApiError(400, "invalid_query", "the query is not valid", problems)
    q = (query.q or "").strip() or None
    cursor = None
    if query.cursor:
        try:
            cursor = queries.Cursor.decode(query.cursor)
        except ValueError as exc:
            raise ApiError(400, "invalid_cursor", "the cursor is not valid") from exc
    with transaction() as session:
        held = None if query.held is None else query.held == "true"
        items, next_cursor = queries.list_sagas(session, saga_filter(query, q, held), cursor)
        counts = queries.counts(session)
        customers = _customers(session, items) if not wants_json() else {}
    next_token = next_cursor.encode() if next_cursor else None
    listed = dump(SagaList.model_validate({"sagas": items, "counts": counts, "next": next_token}))
    if wants_json():
        return jsonify(listed)
    # The filter as given (the page's links and the bulk form carry it on).
    shown = {name: request.args[name] for name in FILTER_FIELDS if request.args.get(name)}
    held_arg = {"held": query.held} if query.held else {}
    return render_template(
        "admin/sagas.html",
        sagas=listed["sagas"],
        counts=listed["counts"],
        state=query.state,
        q=q or "",
        shown=shown,
        # held=true is the list's own filter (a bulk filter has no such field): the links keep it.
        others={**{k: v for k, v in shown.items() if k != "state"}, **held_arg},
        held=query.held == "true",
        definitions=registry.current().names,
        steps=step_names(),
        reasons=[r.value for r in Reason],
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
    ident = _id_or_404(saga_id)
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
    with transaction() as session:
        status, state = operations.act(session, saga_id, action, g.admin_user, note)
    return status, state.value if state else None


def _action_route(action: str) -> Callable[[str], Response]:
    def view(saga_id: str) -> Response:
        ident = _id_or_404(saga_id)
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


FILTER_PREFIX = "filter."


def _filter_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k.startswith(FILTER_PREFIX) and v != ""}


def _form_body(fields: dict[str, Any]) -> dict[str, Any]:
    """A form's flat fields as the JSON body: ``filter.<name>`` fields (blank ones left out)
    make the ``filter``, and ``dry_run=1`` is true."""
    body = {k: v for k, v in fields.items() if not k.startswith(FILTER_PREFIX)}
    if any(k.startswith(FILTER_PREFIX) for k in fields):
        body["filter"] = {k.removeprefix(FILTER_PREFIX): v for k, v in _filter_fields(fields).items()}
    if "dry_run" in body:
        body["dry_run"] = {"1": True, "0": False, "": False}.get(body["dry_run"], body["dry_run"])
    return body


@bp.post("/sagas/bulk")
def bulk() -> Response | str:
    fields = posted_fields(form_only=("return_state",), lists=("saga_ids",))
    try:
        body = parse_bulk(fields if is_json() else _form_body(fields))
    except Invalid as exc:
        raise _invalid(exc, "bulk request") from exc
    if body.filter is None:
        return _bulk_by_ids(body.action, body.saga_ids or [], body.note)
    wanted = saga_filter(body.filter)
    if body.dry_run:
        with transaction() as session:
            count, sample = operations.preview(session, wanted)
        if is_json():
            return jsonify(dump(BulkPreview(count=count, sample=sample)))
        return render_template(
            "admin/bulk_preview.html",
            action=body.action,
            note=body.note or "",
            wanted={k.removeprefix(FILTER_PREFIX): v for k, v in _filter_fields(fields).items()},
            count=count,
            sample=[str(i) for i in sample],
        )
    recorded = body.filter.model_dump(mode="json", exclude_none=True)
    with transaction() as session:
        operation_id = operations.start(
            session, body.action, wanted, recorded, g.admin_user, body.note
        )
    if not is_json():
        return redirect(url_for("admin.operation", operation_id=str(operation_id)), code=303)  # type: ignore[return-value]
    response = jsonify(dump(OperationAccepted(operation_id=operation_id)))
    response.status_code = 202
    return response


def _bulk_by_ids(action: str, saga_ids: list[str], note: str | None) -> Response:
    """Each saga at once, in the request, answering on its own (as one by one)."""
    results = []
    for raw in saga_ids:
        try:
            ident = uuid.UUID(raw)
        except ValueError:
            status = 404  # not an id: no such saga
        else:
            status, _ = _act(ident, action, note)
        results.append(BulkItemResult(saga_id=raw, status=status))  # type: ignore[arg-type]
    if not is_json():
        return redirect(
            url_for("admin.sagas", state=request.form.get("return_state") or None), code=303
        )  # type: ignore[return-value]
    return jsonify(dump(BulkResult(results=results)))


@bp.get("/operations")
def operations_page() -> Response | str:
    with transaction() as session:
        items = queries.operations(session)
    listed = dump(OperationList.model_validate({"operations": items}))
    if wants_json():
        return jsonify(listed)
    return render_template("admin/operations.html", operations=listed["operations"])


@bp.get("/operations/<operation_id>")
def operation(operation_id: str) -> Response | str:
    with transaction() as session:
        view = queries.operation_detail(session, _id_or_404(operation_id, "operation"))
    if view is None:
        raise ApiError(404, "not_found", "no such operation")
    shown = dump(OperationDetail.model_validate(view))
    return jsonify(shown) if wants_json() else render_template("admin/operation.html", op=shown)


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
