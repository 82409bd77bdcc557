"""Words and small formats the pages share (one place for what a reason means to a person)."""

from typing import Any

REASON_TEXT = {
    "out_of_stock": "Cancelled: not enough stock for one of the lines; nothing was charged.",
    "payment_declined": "Cancelled: the card was declined; the reserved stock was released.",
    "retries_exhausted": "A service kept failing, so the order was rolled back.",
    "timeout": "A service did not answer in time, so the order was rolled back.",
    "operator": "An operator aborted this order and rolled it back.",
}
CONFIRMED_TEXT = "Confirmed: stock reserved, card charged, order confirmed."
PENDING_TEXT = "Working on it…"
FAILED_PREFIX = "Failed and waiting for an operator. "


def explain(order: dict[str, Any]) -> str:
    if order["status"] == "confirmed":
        return CONFIRMED_TEXT
    if not order.get("reason"):
        return PENDING_TEXT
    prefix = FAILED_PREFIX if order["status"] == "failed" else ""
    return prefix + REASON_TEXT.get(order["reason"], "")


def page_texts() -> dict[str, Any]:
    """The same words for the live page's script, rendered into the page as data."""
    return {"reasons": REASON_TEXT, "confirmed": CONFIRMED_TEXT, "pending": PENDING_TEXT,
            "failed_prefix": FAILED_PREFIX}


def money(cents: int) -> str:
    return f"{cents / 100:.2f}"


def duration(step: dict[str, Any]) -> str:
    from datetime import datetime

    if not (step.get("started_at") and step.get("finished_at")):
        return ""
    seconds = (datetime.fromisoformat(step["finished_at"])
               - datetime.fromisoformat(step["started_at"])).total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


_STARTS = {"step.dispatched", "compensation.dispatched", "step.retried"}
_ENDS = {
    "step.succeeded": "ok", "compensation.succeeded": "ok", "step.failed": "failed",
    "compensation.failed": "failed", "step.timed_out": "timeout", "step.dead_lettered": "dead",
    "compensation.parked": "dead",
}


def attempt_bars(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each attempt of each step or compensation as (lane, start, end, outcome)."""
    from datetime import datetime

    open_: dict[tuple[str, int], dict[str, Any]] = {}
    bars: list[dict[str, Any]] = []
    for e in timeline:
        if not e.get("step") or not e.get("attempt"):
            continue
        key = (e["step"], e["attempt"])
        at = datetime.fromisoformat(e["at"])
        if e["event"] in _STARTS and key not in open_:
            open_[key] = {"lane": e["step"], "attempt": e["attempt"], "start": at, "end": None,
                          "outcome": "running"}
            bars.append(open_[key])
        elif e["event"] in _ENDS and key in open_ and open_[key]["end"] is None:
            open_[key].update(end=at, outcome=_ENDS[e["event"]])
    return bars


def attempt_chart(timeline: list[dict[str, Any]]) -> Any:
    """A small SVG: one lane per step or compensation, one bar per attempt, coloured by outcome."""
    from datetime import datetime

    from markupsafe import Markup, escape

    bars = attempt_bars(timeline)
    if not bars:
        return Markup('<p class="muted">No attempts yet.</p>')
    now = datetime.fromisoformat(timeline[-1]["at"])
    t0 = min(b["start"] for b in bars)
    t1 = max([now, *[b["end"] for b in bars if b["end"]]])
    span = max((t1 - t0).total_seconds(), 0.001)
    lanes = list(dict.fromkeys(b["lane"] for b in bars))
    width, left, lane_h = 760, 150, 22
    height = lane_h * len(lanes) + 24
    parts = [f'<svg class="attempts" role="img" aria-label="attempts over time" '
             f'viewBox="0 0 {width + left} {height}" width="100%">']
    for i, lane in enumerate(lanes):
        y = i * lane_h + 4
        parts.append(f'<text x="0" y="{y + 13}" class="lane">{escape(lane)}</text>')
    for b in bars:
        end = b["end"] or t1
        x = left + (b["start"] - t0).total_seconds() / span * width
        w = max((end - b["start"]).total_seconds() / span * width, 3)
        y = lanes.index(b["lane"]) * lane_h + 4
        label = f'{b["lane"]} attempt {b["attempt"]}: {b["outcome"]}, {(end - b["start"]).total_seconds() * 1000:.0f} ms'
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="16" rx="3" '
                     f'class="bar bar-{b["outcome"]}"><title>{escape(label)}</title></rect>')
    parts.append(f'<text x="{left}" y="{height - 4}" class="axis">0 s</text>'
                 f'<text x="{left + width}" y="{height - 4}" class="axis" text-anchor="end">'
                 f'{span:.2f} s</text></svg>')
    return Markup("".join(parts))
