"""Browser tier: headless Chromium (Debian's, driven by Playwright's sync API) against the system.

``system`` and ``api`` come from tests/conftest.py; pages reach it through ``audited_system``. Each
page records its console errors and uncaught exceptions, so a test can check that the page broke no
rule (Content-Security-Policy above all).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    HttpCredentials,
    Page,
    sync_playwright,
)

from orchestrator.proof.harness import Processes
from tests.integration.helpers import settle_and_audit

CHROMIUM = os.environ.get("SAGA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
TIMEOUT_MS = 30_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Console:
    """What a page said on its console (errors only) and the exceptions it threw."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", self._on_pageerror)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.type}: {message.text}")

    def _on_pageerror(self, error: Error) -> None:
        self.errors.append(f"pageerror: {error.message}")

    def csp_violations(self) -> list[str]:
        return [e for e in self.errors if "content security policy" in e.lower()]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():  # a missing browser fails the tier, never skips it
        raise FileNotFoundError(f"{CHROMIUM} is missing: run `make browser` (scripts/browser.sh)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def audited_system(system: Processes) -> Iterator[Processes]:
    """The running system; after the module, the invariants still hold (``sagactl audit``).

    Not autouse: a module of this tier that brings up a system of its own must not start this one.
    """
    yield system
    report = settle_and_audit()
    assert report.ok, report.violations


def _context(browser: Browser, system: Processes,
             credentials: HttpCredentials | None = None) -> BrowserContext:
    context = browser.new_context(base_url=system.url, viewport={"width": 1200, "height": 900},
                                  http_credentials=credentials)
    context.set_default_timeout(TIMEOUT_MS)
    return context


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Browser, audited_system: Processes, console: Console) -> Iterator[Page]:
    """A shop visitor's tab, in a fresh context (no cookies shared between tests)."""
    context = _context(browser, audited_system)
    tab = context.new_page()
    console.watch(tab)
    yield tab
    context.close()


@pytest.fixture
def admin_page(browser: Browser, audited_system: Processes, console: Console) -> Iterator[Page]:
    """An operator's tab: HTTP Basic with the app's own credentials (dev secrets of the sandbox)."""
    from orchestrator.ops.config import settings

    cfg = settings()
    context = _context(browser, audited_system,
                       {"username": cfg.admin_user, "password": cfg.admin_password.get_secret_value()})
    tab = context.new_page()
    console.watch(tab)
    yield tab
    context.close()


@pytest.fixture
def shots(artifacts: Path) -> Path:
    path = artifacts / "screenshots"
    path.mkdir(exist_ok=True)
    return path


@contextmanager
def paused(system: Processes, name: str) -> Iterator[None]:
    """Freeze one participant (SIGSTOP on its process group) so a saga waits at its step.

    Kept well under the step timeout, so the sweeper never acts: the saga simply goes on when
    the worker is thawed, as after a slow network.
    """
    group = system.pid(name)
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


