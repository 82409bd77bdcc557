"""Words and small formats the pages share (one place for what a reason means to a person)."""

import math
from datetime import datetime
from typing import Any

from markupsafe import Markup, escape

from orchestrator.registry import TimelineEvent as E

REASON_TEXT = {
    "out_of_stock": "Cancelled: not enough stock for one of the lines; nothing was charged.",
    "payment_declined": "Cancelled: the card was declined; the reserved stock was released.",
    "retries_exhausted": "A service kept failing, so the order was rolled back.",
    "timeout": "A service did not answer in time, so the order was rolled back.",
    "operator": "An operator aborted this order and rolled it back.",
}
CONFIRMED_TEXT = "Confirmed: stock reserved, card charged, order confirmed."
# Statuses that say it all, whatever the reason field holds.
STATUS_TEXT = {
    "confirmed": CONFIRMED_TEXT,
    "returning": "Being returned: refunding the card and taking the stock back.",
    "returned": "Returned: the card was refunded and the stock is back on the shelf.",
}
PENDING_TEXT = "Working on it…"
FAILED_PREFIX = "Failed and waiting for an operator. "


def explain(order: dict[str, Any]) -> str:
    if order["status"] in STATUS_TEXT:
        return STATUS_TEXT[order["status"]]
    if not order.get("reason"):
        return PENDING_TEXT
    prefix = FAILED_PREFIX if order["status"] == "failed" else ""
    return prefix + REASON_TEXT.get(order["reason"], "")


def page_texts() -> dict[str, Any]:
    """The same words for the live page's script, rendered into the page as data."""
    return {
        "reasons": REASON_TEXT,
        "confirmed": CONFIRMED_TEXT,
        "statuses": STATUS_TEXT,
        "pending": PENDING_TEXT,
        "failed_prefix": FAILED_PREFIX,
    }


def money(cents: int) -> str:
    return f"{cents / 100:.2f}"


def duration(step: dict[str, Any]) -> str:
    if not (step.get("started_at") and step.get("finished_at")):
        return ""
    seconds = (
        datetime.fromisoformat(step["finished_at"]) - datetime.fromisoformat(step["started_at"])
    ).total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


_DISPATCHED = {E.STEP_DISPATCHED, E.COMPENSATION_DISPATCHED}
_STARTS = {*_DISPATCHED, E.STEP_RETRIED}
_ENDS = {
    E.STEP_SUCCEEDED: "ok",
    E.COMPENSATION_SUCCEEDED: "ok",
    E.STEP_FAILED: "failed",
    E.COMPENSATION_FAILED: "failed",
    E.STEP_TIMED_OUT: "timeout",
    E.STEP_DEAD_LETTERED: "dead",
    E.COMPENSATION_PARKED: "dead",
}
OUTCOME_TEXT = {
    "ok": "succeeded",
    "failed": "failed",
    "timeout": "timed out",
    "dead": "dead-lettered / parked",
    "running": "in flight",
}


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def attempt_bars(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each attempt of each step or compensation as (lane, kind, attempts, start, end, outcome).

    One bar per lane is in flight at a time. A result names the attempt it ends; when results of
    earlier attempts never arrived (a late reply that was fenced off), the bar spans them all.
    """
    in_flight: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    bars: list[dict[str, Any]] = []
    for e in timeline:
        lane, attempt = e.get("step"), e.get("attempt")
        if not lane or not attempt:
            continue
        if e["event"] in _DISPATCHED:
            kinds.setdefault(lane, e["event"].split(".")[0])
        at, bar = _at(e["at"]), in_flight.get(lane)
        if e["event"] in _STARTS:
            if bar is not None and bar["attempt"] == attempt:
                continue
            if bar is not None:  # a new attempt began with no word from the one in flight
                bar.update(end=at, outcome="timeout")
            in_flight[lane] = {
                "lane": lane,
                "kind": kinds.get(lane, "step"),
                "attempt": attempt,
                "last": attempt,
                "start": at,
                "end": None,
                "outcome": "running",
            }
            bars.append(in_flight[lane])
        elif e["event"] in _ENDS and bar is not None and bar["attempt"] <= attempt:
            bar.update(end=at, outcome=_ENDS[e["event"]], last=attempt)
            del in_flight[lane]
    return bars


def _tick_step(span_s: float, ticks: int = 6) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks over the span."""
    raw = span_s / ticks
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _seconds(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:g} s"


def attempt_chart(timeline: list[dict[str, Any]], now: str | None = None) -> Any:
    """An SVG: one lane per step or compensation, one bar per attempt coloured by its outcome,
    a time axis from the saga's start, and a marker at each operator action.

    ``now`` stretches an attempt still in flight to the present (a hanging step shows its age).
    """
    bars = attempt_bars(timeline)
    if not bars:
        return Markup('<p class="muted">No attempts yet.</p>')
    t0 = _at(timeline[0]["at"])
    ends = [b["end"] for b in bars if b["end"]]
    last = _at(now) if now and any(b["end"] is None for b in bars) else _at(timeline[-1]["at"])
    t1 = max([last, *ends])
    span = max((t1 - t0).total_seconds(), 0.001)
    lanes = list(dict.fromkeys(b["lane"] for b in bars))
    kind = {b["lane"]: b["kind"] for b in bars}
    width, left, right, lane_h, top = 720, 170, 20, 26, 8
    plot_h = lane_h * len(lanes)
    height = top + plot_h + 26

    def x_of(t: datetime) -> float:
        return left + (t - t0).total_seconds() / span * width

    parts = [
        f'<svg class="attempts" role="img" aria-label="attempts of each step over time" '
        f'viewBox="0 0 {left + width + right} {height}" preserveAspectRatio="xMinYMin meet">'
    ]
    step = _tick_step(span)
    tick = 0.0
    while tick <= span + 1e-9:
        x = left + tick / span * width
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
            f'class="grid"/><text x="{x:.1f}" y="{top + plot_h + 16}" class="axis" '
            f'text-anchor="middle">{_seconds(round(tick, 6))}</text>'
        )
        tick += step
    for i, lane in enumerate(lanes):
        y = top + i * lane_h
        parts.append(
            f'<rect x="0" y="{y}" width="{left + width + right}" height="{lane_h}" '
            f'class="lane-bg lane-{i % 2}"/>'
        )
        label = ("↩ " if kind[lane] == "compensation" else "") + lane
        parts.append(
            f'<text x="8" y="{y + 17}" class="lane lane-{kind[lane]}">{escape(label)}</text>'
        )
    for b in bars:
        end = b["end"] or t1
        x = x_of(b["start"])
        w = max((end - b["start"]).total_seconds() / span * width, 4)
        y = top + lanes.index(b["lane"]) * lane_h + 5
        took = _seconds((end - b["start"]).total_seconds())
        which = f"{b['attempt']}" if b["last"] == b["attempt"] else f"{b['attempt']}-{b['last']}"
        label = (
            f"{b['lane']} attempt {which}: {OUTCOME_TEXT[b['outcome']]}, "
            f"{took}{' so far' if b['end'] is None else ''}"
        )
        parts.append(
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="16" rx="3" '
            f'class="bar bar-{b["outcome"]}"><title>{escape(label)}</title></rect>'
        )
        if w >= 8 * len(which) + 8:
            parts.append(
                f'<text x="{x + w / 2:.1f}" y="{y + 12}" class="bar-label" '
                f'text-anchor="middle">{which}</text>'
            )
    for e in timeline:
        if e["event"] in (E.OPERATOR_RETRY, E.OPERATOR_COMPENSATE, E.OPERATOR_BULK):
            x = x_of(_at(e["at"]))
            what = f"{e['event']} by {e.get('actor') or '?'}" + (
                f": {e['detail']}" if e.get("detail") else ""
            )
            parts.append(
                f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + plot_h}" '
                f'class="operator"><title>{escape(what)}</title></line>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch bar-{k}"></span>{v}</li>' for k, v in OUTCOME_TEXT.items()
    )
    return Markup(
        "".join(parts) + f'<ul class="legend">{legend}'
        '<li><span class="swatch operator"></span>operator action</li></ul>'
    )


def elapsed(at: str | None, since: str | None) -> str:
    """``+1.234 s`` from the saga's start, for the timeline."""
    if not (at and since):
        return ""
    return f"+{(_at(at) - _at(since)).total_seconds():.3f} s"
