"""The pages in a real browser against the running system: the order form and its live order page,
validation errors, the admin console's retry of a parked saga (one, and every saga matching a
filter after a dry-run count), a service paused and resumed through an incident, and a
Content-Security-Policy the pages keep."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from playwright.sync_api import Page, Response, expect

from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.e2e.conftest import Console, paused
from tests.integration.helpers import make_product, order_body, place, wait_final
from web.presenters import CONFIRMED_TEXT, REASON_TEXT

LIVE_MS = 30_000


def _fill_order(page: Page, customer: str, sku: str, quantity: str, token: str) -> None:
    page.goto("/")
    page.fill("#customer_id", customer)
    page.fill(f"#qty_{sku}", quantity)
    page.fill("#card_token", token)


def _submit(page: Page) -> Response:
    with page.expect_navigation() as nav:
        page.click("#place-order")
    response = nav.value
    assert response is not None
    return response


def _watch_live(page: Page, order_id: str) -> tuple[list[str], list[str]]:
    """From now on: main-frame navigations, and the page's own JSON polls of this order."""
    page.evaluate("() => { window.__e2eMarker = 'still here'; }")
    navigations: list[str] = []
    polls: list[str] = []
    page.on("framenavigated",
            lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    page.on("request", lambda r: polls.append(r.url)
            if r.resource_type == "fetch" and r.url.endswith(f"/orders/{order_id}") else None)
    return navigations, polls


def _assert_not_reloaded(page: Page, navigations: list[str], polls: list[str]) -> None:
    assert navigations == [], f"the page navigated: {navigations}"
    assert page.evaluate("() => window.__e2eMarker") == "still here", "the page was reloaded"
    assert polls, "the page changed without asking the server (no JSON poll seen)"


def test_order_through_the_form_turns_confirmed_live(
    page: Page, system: Processes, console: Console, shots: Path
) -> None:
    sku = make_product(stock=10, price_cents=250)
    _fill_order(page, f"c-{uuid.uuid4().hex[:8]}", sku, "2", "tok_visa")
    # The orders worker is frozen, so the saga waits at orders.confirm while the page loads.
    with paused(system, "orders"):
        response = _submit(page)
        redirect = response.request.redirected_from
        assert redirect is not None and redirect.method == "POST"
        redirect_response = redirect.response()
        assert redirect_response is not None and redirect_response.status == 303
        assert response.status == 200 and "/orders/" in page.url
        order_id = page.url.rstrip("/").rsplit("/", 1)[1]
        expect(page.locator("#order-status")).to_have_text("pending")
        navigations, polls = _watch_live(page, order_id)
    expect(page.locator("#order-status")).to_have_text("confirmed", timeout=LIVE_MS)
    expect(page.locator("#order-explain")).to_have_text(CONFIRMED_TEXT)
    expect(page.locator("#saga-state")).to_have_text("completed")
    expect(page.locator('#steps li[data-step="orders.confirm"] .badge').first).to_have_text(
        "succeeded")
    expect(page.locator("#live")).to_have_text("")
    # Nothing was undone, so no compensation is offered to the shopper's eye.
    expect(page.locator("#steps")).not_to_contain_text("refund")
    _assert_not_reloaded(page, navigations, polls)
    page.screenshot(path=str(shots / "order-confirmed.png"), full_page=True)
    assert console.csp_violations() == []


def test_declined_card_shows_cancelled_and_why_live(
    page: Page, system: Processes, console: Console, shots: Path
) -> None:
    sku = make_product(stock=10)
    _fill_order(page, f"c-{uuid.uuid4().hex[:8]}", sku, "1", "tok_chargeDeclined")
    with paused(system, "payment"):
        _submit(page)
        order_id = page.url.rstrip("/").rsplit("/", 1)[1]
        expect(page.locator("#order-status")).to_have_text("pending")
        navigations, polls = _watch_live(page, order_id)
    expect(page.locator("#order-status")).to_have_text("cancelled", timeout=LIVE_MS)
    expect(page.locator("#order-reason")).to_have_text("· reason: payment declined")
    expect(page.locator("#order-explain")).to_have_text(REASON_TEXT["payment_declined"])
    expect(page.locator("#saga-state")).to_have_text("compensated")
    expect(page.locator('#steps li[data-step="inventory.reserve"]')).to_contain_text(
        "succeeded inventory.reserve · succeeded inventory.release")
    _assert_not_reloaded(page, navigations, polls)
    page.screenshot(path=str(shots / "order-cancelled.png"), full_page=True)
    assert console.csp_violations() == []


def _preceding_field(page: Page, error_selector: str) -> str:
    """The id of the nearest form field before an error message: the field it stands next to."""
    found: str = page.eval_on_selector(error_selector, """(el) => {
        let node = el.previousElementSibling;
        while (node && !node.matches('input, select, textarea, table')) {
            node = node.previousElementSibling;
        }
        return node ? (node.id || node.tagName) : '';
    }""")
    return found


def test_validation_errors_stand_next_to_their_fields_and_keep_the_values(
    page: Page, console: Console, shots: Path
) -> None:
    sku = make_product(stock=10)
    too_long = "c" * 65
    page.goto("/")
    # The form's maxlength stops a person; a client that edits the page (devtools) is not stopped.
    page.eval_on_selector("#customer_id", "(el) => el.removeAttribute('maxlength')")
    page.fill("#customer_id", too_long)
    page.fill(f"#qty_{sku}", "3")
    page.fill("#card_token", "nope")
    response = _submit(page)
    assert response.status == 422
    expect(page.locator("p.error[role=alert]")).to_be_visible()
    customer_error = 'p.field-error[data-field="customer_id"]'
    card_error = 'p.field-error[data-field="payment.card_token"]'
    expect(page.locator(customer_error)).to_contain_text("64")
    expect(page.locator(card_error)).to_contain_text("tok_")
    assert _preceding_field(page, customer_error) == "customer_id"
    assert _preceding_field(page, card_error) == "card_token"
    for field_id in ("customer_id", "card_token"):
        expect(page.locator(f"#{field_id}")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#customer_id")).to_have_value(too_long)
    expect(page.locator("#card_token")).to_have_value("nope")
    expect(page.locator(f"#qty_{sku}")).to_have_value("3")
    page.screenshot(path=str(shots / "order-form-errors.png"), full_page=True)
    assert console.csp_violations() == []


def _parked_saga(api: Api) -> tuple[str, str]:
    """An order whose confirmation fails and whose refund outlives its budget (3): it parks."""
    body = order_body(make_product(stock=10),
                      faults={"orders.confirm": "fail", "payment.refund": "transient:4"})
    placed = place(api, body)
    view = wait_final(api, placed["order_id"])
    assert view["saga"]["state"] == "failed", view["saga"]
    return placed["saga_id"], placed["order_id"]


def test_operator_retries_a_parked_saga_from_the_admin_pages(
    admin_page: Page, api: Api, console: Console, shots: Path
) -> None:
    saga_id, order_id = _parked_saga(api)
    page = admin_page
    page.goto("/admin/sagas?state=failed")
    row = page.locator(f'#saga-list tr[data-saga-id="{saga_id}"]')
    expect(row).to_be_visible()
    expect(row.locator(".badge").first).to_have_text("failed")
    page.screenshot(path=str(shots / "admin-failed-list.png"), full_page=True)

    with page.expect_navigation():
        row.locator(f'a[href$="/admin/sagas/{saga_id}"]').click()
    expect(page.locator("#saga-state")).to_have_text("failed")
    expect(page.locator("#timeline li.ev-compensation-parked")).to_have_count(1)
    expect(page.locator("#timeline li.ev-step-failed")).not_to_have_count(0)
    chart = page.locator("svg.attempts")
    expect(chart).to_be_visible()
    assert chart.locator("rect.bar").count() >= 4  # three steps, then the refund's attempts
    assert chart.locator("rect.bar-dead").count() >= 1  # the parked refund
    page.screenshot(path=str(shots / "admin-saga-parked.png"), full_page=True)

    page.fill('form.action:has(#retry-button) input[name="note"]', "e2e: refund service is back")
    with page.expect_navigation() as nav:
        page.click("#retry-button")
    assert nav.value is not None and nav.value.url.endswith(f"/admin/sagas/{saga_id}")
    expect(page.locator("#timeline li.ev-operator-retry")).to_contain_text(
        "e2e: refund service is back")

    final = wait_final(api, order_id)
    assert final["saga"]["state"] == "compensated", [
        (e["event"], e["step"], e["attempt"], e["detail"]) for e in final["saga"]["timeline"]]
    page.reload()
    expect(page.locator("#saga-state")).to_have_text("compensated")
    page.screenshot(path=str(shots / "admin-saga-compensated.png"), full_page=True)
    page.goto("/admin/sagas?state=failed")
    expect(page.locator(f'#saga-list tr[data-saga-id="{saga_id}"]')).to_have_count(0)
    page.goto("/admin/sagas?state=compensated")
    expect(page.locator(f'#saga-list tr[data-saga-id="{saga_id}"]')).to_have_count(1)
    assert console.csp_violations() == []


def test_pages_send_a_csp_they_comply_with(
    page: Page, admin_page: Page, api: Api, console: Console
) -> None:
    placed = place(api, order_body(make_product(stock=5)))
    wait_final(api, placed["order_id"])
    visits = [(page, "/"), (page, f"/orders/{placed['order_id']}"),
              (admin_page, "/admin/sagas"), (admin_page, f"/admin/sagas/{placed['saga_id']}"),
              (admin_page, "/admin/dead-letters")]
    for tab, path in visits:
        response = tab.goto(path)
        assert response is not None and response.status == 200, path
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, (path, csp)
        assert response.headers.get("x-content-type-options") == "nosniff", path
        tab.wait_for_load_state("load")
    assert console.csp_violations() == [], console.errors

    # The detector itself works: an inline script is refused and reported.
    page.evaluate("""() => { const s = document.createElement('script');
                             s.textContent = 'window.__inlineRan = true';
                             document.body.appendChild(s); }""")
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__inlineRan === undefined")
    assert console.csp_violations(), console.errors


def test_a_confirmed_order_is_returned_from_its_page(
    page: Page, system: Processes, api: Api, console: Console, shots: Path
) -> None:
    from web.presenters import STATUS_TEXT

    sku = make_product(stock=10, price_cents=250)
    order_id = place(api, order_body(sku, quantity=2))["order_id"]
    assert wait_final(api, order_id)["status"] == "confirmed"
    page.goto(f"/orders/{order_id}")
    page.fill("#return-reason", "the wrong colour")
    with page.expect_navigation() as nav:
        page.click("#return-button")
    response = nav.value
    assert response is not None and response.status == 200
    redirect = response.request.redirected_from
    assert redirect is not None and redirect.method == "POST"
    expect(page.locator("#order-status")).to_have_text("returned", timeout=LIVE_MS)
    expect(page.locator("#order-explain")).to_have_text(STATUS_TEXT["returned"])
    page.reload()
    expect(page.locator("#returns li[data-saga-id] > .badge").first).to_have_text("completed")
    expect(page.locator("#return-button")).to_have_count(0)  # returned: nothing to return
    page.screenshot(path=str(shots / "order-returned.png"), full_page=True)
    assert console.csp_violations() == []


def test_operator_retries_every_saga_matching_a_filter_after_counting_them(
    admin_page: Page, api: Api, console: Console, shots: Path
) -> None:
    since = datetime.now(UTC).isoformat()
    parked = [_parked_saga(api) for _ in range(3)]
    reason = api.order(parked[0][1])["reason"]
    page = admin_page
    page.goto("/admin/sagas?state=failed")
    page.select_option("#reason", reason)
    page.select_option("#step", "payment.charge")
    page.fill("#created_after", since)
    with page.expect_navigation():
        page.click("#filter-apply")
    expect(page.locator("#saga-list tr[data-saga-id]")).to_have_count(3)

    page.select_option("#bulk-filter-action", "retry")
    page.fill("#bulk-filter-note", "e2e: provider back")
    with page.expect_navigation():
        page.click("#bulk-filter-preview")
    expect(page.locator("#bulk-count")).to_have_attribute("data-count", "3")
    expect(page.locator("#bulk-sample li")).to_have_count(3)
    assert {api.order(order_id)["saga"]["state"] for _, order_id in parked} == {"failed"}, (
        "the count acted on nothing"
    )
    page.screenshot(path=str(shots / "admin-bulk-preview.png"), full_page=True)

    with page.expect_navigation() as nav:
        page.click("#bulk-confirm")
    assert nav.value is not None and "/admin/operations/" in nav.value.url
    # The page refreshes itself until every saga has its result.
    expect(page.locator("#operation-state")).to_have_text("done", timeout=LIVE_MS)
    expect(page.locator('#operation-items tr[data-status="202"]')).to_have_count(3)
    page.screenshot(path=str(shots / "admin-operation-done.png"), full_page=True)
    for _, order_id in parked:
        assert wait_final(api, order_id)["saga"]["state"] == "compensated"
    operation_id = nav.value.url.rsplit("/", 1)[1]
    page.goto("/admin/operations")
    expect(page.locator(f'#operations tr[data-operation-id="{operation_id}"]')).to_have_count(1)
    assert console.csp_violations() == []


def test_an_operator_pauses_payment_watches_orders_wait_and_resumes_them(
    admin_page: Page, api: Api, console: Console, shots: Path
) -> None:
    """The incident in the console: pause payment with a note, orders placed meanwhile wait
    (held, pending, nobody charged), a resume from the same page sends them on to confirmed."""
    page = admin_page
    page.goto("/admin/services")
    row = page.locator("#service-payment")
    expect(row).to_have_attribute("data-state", "running")
    row.locator("input[name=note]").fill("e2e: provider down")
    with page.expect_navigation():
        row.locator("button", has_text="Pause").click()
    expect(row).to_have_attribute("data-state", "paused")
    expect(row.locator(".reason-text")).to_have_text("e2e: provider down")

    sku = make_product(stock=10)
    placed = [place(api, order_body(sku)) for _ in range(3)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # each load shows what the database holds then
        page.reload()
        if row.locator(".held").inner_text().strip() == "3":
            break
    expect(row.locator(".held")).to_have_text("3")
    page.screenshot(path=str(shots / "admin-services-paused.png"), full_page=True)
    assert {api.order(p["order_id"])["status"] for p in placed} == {"pending"}

    with page.expect_navigation():
        row.locator("button", has_text="Resume").click()
    expect(row).to_have_attribute("data-state", "running")
    for p in placed:
        assert wait_final(api, p["order_id"])["status"] == "confirmed"
    page.reload()
    expect(row.locator(".held")).to_have_text("0")
    page.screenshot(path=str(shots / "admin-services-resumed.png"), full_page=True)
    assert console.csp_violations() == []
