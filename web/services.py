"""The services console: each participant service's state, and pausing or resuming one.

Same rules as the rest of the admin: HTTP Basic, a JSON post or a CSRF form post. A resume asks an
orchestrator to release the held commands once the change committed (orchestrator/kernel/release.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, jsonify, render_template, url_for

from models.db import transaction
from orchestrator.kernel import service_states
from orchestrator.ops import process_metrics
from orchestrator.ops.config import settings
from web import admin
from web.errors import ApiError, wants_json
from web.http import accepted, is_json, posted_fields
from web.schemas import ServiceActionResult, ServiceList, ServicePauseIn, ServiceResumeIn, dump
from web.validation import Invalid, validate

log = logging.getLogger(__name__)

bp = Blueprint("services", __name__, url_prefix="/admin/services")
bp.before_request(admin.require_admin)

_FORM_BOOLEANS = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}


def _consumers(names: list[str]) -> dict[str, int]:
    try:
        counts = process_metrics.queue_counts(settings().broker_url, names, timeout_s=2)
    except Exception as exc:  # the page still answers; consumers show as unknown
        log.warning("services page: broker did not answer (%s)", exc)
        return {}
    return {queue: consumers for queue, (_, consumers) in counts.items()}


@bp.get("")
def services() -> Response | str:
    with transaction() as session:
        views = service_states.overview(session)
    consumers = _consumers([v.service for v in views])
    listed = dump(
        ServiceList.model_validate(
            {
                "services": [
                    {
                        **{k: getattr(v, k) for k in ("service", "state", "since", "by", "note")},
                        "hold_compensations": v.hold_compensations,
                        "held": v.held,
                        "calls": v.calls,
                        "failure_rate": v.failure_rate,
                        "consumers": consumers.get(v.service),
                    }
                    for v in views
                ]
            }
        )
    )
    if wants_json():
        return jsonify(listed)
    cfg = settings()
    return render_template(
        "admin/services.html",
        services=listed["services"],
        window_s=cfg.breaker_window_s,
        threshold=cfg.breaker_threshold,
        resume_rate=cfg.resume_rate,
    )


def _fields() -> Any:
    fields = posted_fields()
    if not is_json() and "hold_compensations" in fields:  # a form sends text
        value = str(fields["hold_compensations"]).lower()
        fields["hold_compensations"] = _FORM_BOOLEANS.get(value, fields["hold_compensations"])
    return fields


def _route(verb: str, act: Callable[[Any, str, Any], None]) -> Callable[[str], Response]:
    model = ServicePauseIn if verb == "pause" else ServiceResumeIn

    def view(service: str) -> Response:
        try:
            service_states.known(service)
        except service_states.UnknownService as exc:
            raise ApiError(404, "not_found", "no such service") from exc
        try:
            body = validate(model, _fields())
        except Invalid as exc:
            raise ApiError(422, "validation_failed", f"the {verb} is not valid", exc.details) from exc
        try:
            with transaction() as session:
                act(session, service, body)
                state = service_states.state_of(session, service).state
        except service_states.AlreadyInState as exc:
            raise ApiError(409, "not_applicable", str(exc)) from exc
        if verb == "resume":
            service_states.kick(service)
        result = ServiceActionResult(service=service, state=state)  # type: ignore[arg-type]
        return accepted(result, url_for("services.services"))

    view.__name__ = f"service_{verb}"
    return view


def _pause(session: Any, service: str, body: Any) -> None:
    service_states.pause(session, service, g.admin_user, body.note, body.hold_compensations)


def _resume(session: Any, service: str, body: Any) -> None:
    service_states.resume(session, service, g.admin_user, body.note)


bp.add_url_rule("/<service>/pause", view_func=_route("pause", _pause), methods=["POST"])
bp.add_url_rule("/<service>/resume", view_func=_route("resume", _resume), methods=["POST"])
