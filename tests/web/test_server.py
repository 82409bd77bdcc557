"""The web as ``sagactl web`` runs it (gunicorn, its worker and logger classes), read from its log file:
no forged log lines, no card token in the access log, request ids checked and echoed, gunicorn's own
errors in the contract's JSON shape, loopback unless told otherwise."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from orchestrator.proof.harness import Processes, Sandbox, free_port

FORGED = '127.0.0.1 - admin [01/Jan/2026] "GET /forged HTTP/1.1" 200 0'  # no colon: Basic's user ends at one
TOKEN = "tok_visa_abcdef1234"


@pytest.fixture(scope="module")
def web(web_sandbox: Sandbox, artifacts: Path) -> Iterator[Processes]:
    procs = Processes(web_sandbox, artifacts / "logs" / "web-server")
    try:
        procs.start("web")
        yield procs
    finally:
        procs.stop_all()


def log_once(web: Processes, present: Callable[[str], bool], timeout_s: float = 20) -> str:
    """The web's log as soon as ``present`` finds what a request must have written to it."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = web.output("web")
        if present(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError("the expected log line never came:\n" + text[-3000:])
        time.sleep(0.1)


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}


# ---------------------------------------------------------------- log injection


def test_a_user_name_cannot_forge_an_access_log_line(web: Processes) -> None:
    user = f"mallory-{uuid.uuid4().hex[:8]}"
    answer = requests.get(f"{web.url}/admin", headers=basic(f"{user}\n{FORGED}\x1b[2J"), timeout=10)
    assert answer.status_code == 401
    text = log_once(web, lambda t: user in t)
    (line,) = [line for line in text.splitlines() if user in line]
    assert f"{user}\\n127.0.0.1 - admin" in line and "\\x1b[2J" in line  # escaped, on its line
    assert not any(line.startswith("127.0.0.1 - admin") for line in text.splitlines())
    assert "\x1b" not in text


def test_the_access_log_masks_card_tokens_in_the_url_and_user_agent(web: Processes) -> None:
    marker = uuid.uuid4().hex
    answer = requests.get(
        f"{web.url}/orders/{TOKEN}?card={TOKEN}&m={marker}",
        headers={"User-Agent": f"agent/{TOKEN}"},
        timeout=10,
    )
    assert answer.status_code == 404
    text = log_once(web, lambda t: marker in t)
    (line,) = [line for line in text.splitlines() if marker in line]
    assert TOKEN not in text
    assert line.count("••••1234") == 3  # path, query, User-Agent: the last four only


def _order(web: Processes, request_id: str) -> tuple[requests.Response, list[str]]:
    """Place an order with ``request_id``; the answer and the web's log lines about the order."""
    body = {
        "customer_id": "c-log",
        "items": [{"sku": "SKU-APPLE", "quantity": 1}],
        "payment": {"card_token": "tok_visa"},
    }
    answer = requests.post(
        f"{web.url}/orders", json=body, headers={"X-Request-Id": request_id}, timeout=10
    )
    assert answer.status_code == 202, answer.text
    order_id = answer.json()["order_id"]
    text = log_once(web, lambda t: f"order_id={order_id}" in t)
    return answer, [line for line in text.splitlines() if f"order_id={order_id}" in line]


def test_a_forged_request_id_is_replaced_and_never_logged(web: Processes) -> None:
    forged = f"spoof saga_id={uuid.uuid4()}] web: FAKE"
    answer, lines = _order(web, forged)
    assert "FAKE" not in web.output("web")
    given = answer.headers["X-Request-Id"]
    assert given != forged and uuid.UUID(given)
    assert lines and all(f"request_id={given}]" in line for line in lines)


def test_a_well_formed_request_id_is_kept_and_echoed(web: Processes) -> None:
    mine = f"req-{uuid.uuid4().hex[:12]}.a_b"
    answer, lines = _order(web, mine)
    assert answer.headers["X-Request-Id"] == mine
    assert lines and all(f"request_id={mine}]" in line for line in lines)


def test_every_answer_carries_a_request_id(web: Processes) -> None:
    answer = requests.get(f"{web.url}/healthz", timeout=10)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", answer.headers["X-Request-Id"])


def test_json_keeps_the_order_it_was_written_in(web: Processes) -> None:
    """Flask 2.3 dropped JSON_SORT_KEYS; the app's JSON provider is what keeps keys unsorted."""
    text = requests.get(f"{web.url}/healthz", timeout=10).text
    assert text.index('"database"') < text.index('"broker"')  # health.check()'s order


# ---------------------------------------------------------------- gunicorn's own errors


def raw_request(web: Processes, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line_too_long"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(120)) + b"\r\n",
            431,
            "request_headers_too_large",
        ),
        (b"NOT A REQUEST\r\n\r\n", 400, "malformed_request"),
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "malformed_request"),
    ],
    ids=["request-line", "header-size", "header-count", "request-line-shape", "header-name"],
)
def test_gunicorns_own_errors_are_json_in_the_contracts_shape(
    web: Processes, data: bytes, status: int, code: str
) -> None:
    got, headers, body = raw_request(web, data)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code and error["message"]


# ---------------------------------------------------------------- bind address


def listening_on(pid: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_the_web_binds_loopback_unless_told_otherwise(web: Processes) -> None:
    assert listening_on(web.pid("web")) == {"127.0.0.1"}
    port = free_port()
    try:
        web.start("web#all", PORT=str(port), SAGA_WEB_HOST="0.0.0.0")
        assert listening_on(web.pid("web#all")) == {"0.0.0.0"}
    finally:
        if web.alive("web#all"):
            web.kill("web#all")
