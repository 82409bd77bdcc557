"""The shop's side: the order form, POST /orders (JSON or form), the order page, the products."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)

from models.db import snapshot, transaction
from orchestrator import queries
from orchestrator.ops.logs import log_context
from orchestrator.sagas import once, returning
from orchestrator.sagas import placing as ordering
from web.errors import ApiError, wants_json
from web.http import check_csrf, json_body, read_body
from web.schemas import OrderIn, OrderOut, Placed, ProductOut, dump
from web.validation import IDEMPOTENCY_KEY, InvalidOrder, fingerprint, parse_order, parse_return

bp = Blueprint("orders", __name__)

TEST_TOKENS = ("tok_visa", "tok_chargeDeclined")


def _form_quantity(raw: str) -> int | str:
    """A form sends text: plain ASCII digits become the integer, anything else stays text and
    fails validation (``"²".isdigit()`` is true and ``int()`` refuses 5000 digits)."""
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else raw


def _form_as_order(form: Any, skus: list[str]) -> dict[str, Any]:
    """The form's fields in the JSON API's shape, so both go through one validation."""
    items = []
    for sku in skus:
        raw = (form.get(f"qty_{sku}") or "").strip()
        if raw and raw != "0":
            items.append({"sku": sku, "quantity": _form_quantity(raw)})
    return {
        "customer_id": form.get("customer_id", ""),
        "items": items,
        "payment": {"card_token": form.get("card_token", "")},
    }


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "invalid_idempotency_key",
                       "Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key


@contextlib.contextmanager
def _starting(what: str) -> Iterator[None]:
    """The answers of a saga start once per Idempotency-Key (orchestrator/sagas/once.py)."""
    try:
        yield
    except once.Backlogged as exc:
        raise ApiError(503, "backlogged", f"too many {what} in flight; try again shortly",
                       headers={"Retry-After": "5"}) from exc
    except once.IdempotencyMismatch as exc:
        raise ApiError(409, "idempotency_mismatch",
                       "this Idempotency-Key was used with a different body") from exc
    except once.IdempotencyInFlight as exc:
        raise ApiError(409, "idempotency_in_flight",
                       "a request with this Idempotency-Key is still being processed") from exc


def _place(order: OrderIn, raw: Any, key: str | None) -> ordering.Placement:
    new = ordering.NewOrder(
        customer_id=order.customer_id,
        items=[(item.sku, item.quantity) for item in order.items],
        card_token=order.payment.card_token,
        faults=order.faults,
    )
    try:
        with _starting("orders"):
            return ordering.place_order(new, key, fingerprint(raw))
    except ordering.UnknownSku as exc:  # the catalogue changed between validation and insert
        raise ApiError(422, "validation_failed", "unknown product",
                       [{"field": "items", "message": f"unknown product {exc}"}]) from exc


def _catalogue() -> list[dict[str, Any]]:
    with transaction() as session:
        return queries.products(session)


# SKUs seen in the catalogue. Products are never deleted, so a SKU once known stays known and
# the hot path skips a database round trip; an unseen SKU is always looked up.
_seen_skus: set[str] = set()


def _known_skus(skus: list[str]) -> set[str]:
    unseen = [sku for sku in skus if sku not in _seen_skus]
    if unseen:
        with transaction() as session:
            _seen_skus.update(queries.known_skus(session, unseen))
    return {sku for sku in skus if sku in _seen_skus}


@bp.get("/")
def form() -> str:
    return render_template("orders/form.html", products=_catalogue(), tokens=TEST_TOKENS,
                           values={}, errors={})


@bp.post("/orders")
def create() -> Response | tuple[Response, int]:
    read_body()
    mimetype = request.mimetype
    if mimetype == "application/json":
        raw = json_body()
        is_form = False
    elif mimetype == "application/x-www-form-urlencoded":
        check_csrf()
        is_form = True
        raw = _form_as_order(request.form, [p["sku"] for p in _catalogue()])
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send application/json or an HTML form (application/x-www-form-urlencoded)")
    key = _idempotency_key()
    try:
        # The catalogue is looked up only for skus that passed validation (no NUL, no surrogate
        # ever reaches the database driver).
        order = parse_order(raw, fault_injection=current_app.config["FAULT_INJECTION"],
                            known_skus=_known_skus)
    except InvalidOrder as exc:
        if is_form:
            return _form_errors(request.form, exc.details)
        raise ApiError(422, "validation_failed", "the order is not valid", exc.details) from exc
    placed = _place(order, raw, key)
    with log_context(saga_id=placed.saga_id, order_id=placed.order_id):
        current_app.logger.info("order %s", "accepted" if placed.created else "replayed (same key)")
    location = url_for("orders.show", order_id=placed.order_id)
    if is_form:
        return redirect(location, code=303)  # type: ignore[return-value]
    status = "pending" if placed.created else _status(placed.order_id)
    response = jsonify(dump(Placed(order_id=placed.order_id, saga_id=placed.saga_id,
                                   status=status)))  # type: ignore[arg-type]
    response.status_code = 202 if placed.created else 200
    response.headers["Location"] = location
    return response


def _status(order_id: uuid.UUID) -> str:
    with snapshot() as session:
        view = queries.order_view(session, order_id)
    return view["status"] if view else "pending"


def _form_errors(form: Any, details: list[dict[str, str]]) -> tuple[Response, int]:
    errors: dict[str, list[str]] = {}
    for d in details:
        errors.setdefault(d["field"], []).append(d["message"])
    page = render_template("orders/form.html", products=_catalogue(), tokens=TEST_TOKENS,
                           values=form, errors=errors)
    return Response(page, mimetype="text/html"), 422


@bp.get("/orders/<order_id>")
def show(order_id: str) -> Response | str:
    try:
        ident = uuid.UUID(order_id)
    except ValueError as exc:
        raise ApiError(404, "not_found", "no such order") from exc
    with snapshot() as session:
        view = queries.order_view(session, ident)
    if view is None:
        raise ApiError(404, "not_found", "no such order")
    public = dump(OrderOut.of(view))
    if wants_json():
        return jsonify(public)
    return render_template("orders/show.html", order=public)


@bp.post("/orders/<order_id>/return")
def return_order(order_id: str) -> Response | tuple[Response, int]:
    """Start the order's return saga (the contract's POST /orders/<order_id>/return)."""
    read_body()
    try:
        ident = uuid.UUID(order_id)
    except ValueError as exc:
        raise ApiError(404, "not_found", "no such order") from exc
    mimetype = request.mimetype
    if mimetype == "application/json":
        raw = json_body() if request.get_data(cache=True).strip() else {}
        is_form = False
    elif mimetype == "application/x-www-form-urlencoded":
        check_csrf()
        is_form = True
        raw = {"reason": request.form["reason"]} if request.form.get("reason") else {}
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send application/json or an HTML form (application/x-www-form-urlencoded)")
    key = _idempotency_key()
    try:
        wanted = parse_return(raw, fault_injection=current_app.config["FAULT_INJECTION"])
    except InvalidOrder as exc:
        raise ApiError(422, "validation_failed", "the return is not valid", exc.details) from exc
    try:
        with _starting("sagas"):
            started = returning.start_return(ident, wanted.reason, wanted.faults, key,
                                             fingerprint(raw))
    except returning.OrderNotFound as exc:
        raise ApiError(404, "not_found", "no such order") from exc
    except returning.NotReturnable as exc:
        raise ApiError(409, "not_returnable", str(exc)) from exc
    with log_context(saga_id=started.saga_id, order_id=started.order_id):
        current_app.logger.info("return %s", "accepted" if started.created else "replayed")
    location = url_for("orders.show", order_id=started.order_id)
    if is_form:
        return redirect(location, code=303)  # type: ignore[return-value]
    response = jsonify(dump(Placed(order_id=started.order_id, saga_id=started.saga_id,
                                   status=started.status)))
    response.status_code = 202 if started.created else 200
    response.headers["Location"] = location
    return response


@bp.get("/products")
def products() -> Response:
    return jsonify([dump(ProductOut.model_validate(p)) for p in _catalogue()])
