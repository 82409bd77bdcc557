"""A small HTTP client of the system's API, shared by demo, bench and chaos."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import requests

from models.enums import SagaState


@dataclass
class Api:
    url: str
    session: requests.Session

    @classmethod
    def connect(cls, url: str) -> Api:
        return cls(url.rstrip("/"), requests.Session())

    def place(self, body: dict[str, Any], key: str | None = None) -> requests.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.session.post(f"{self.url}/orders", json=body, headers=headers, timeout=30)

    def return_order(
        self, order_id: str, body: dict[str, Any] | None = None, key: str | None = None
    ) -> requests.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.session.post(
            f"{self.url}/orders/{order_id}/return", json=body or {}, headers=headers, timeout=30
        )

    def order(self, order_id: str) -> dict[str, Any]:
        r = self.session.get(
            f"{self.url}/orders/{order_id}", headers={"Accept": "application/json"}, timeout=30
        )
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def _poll(self, order_id: str) -> dict[str, Any] | None:
        """The order's view, or None on a 503 (the web lost its database connection to a restart
        or a terminated session: the contract's "try again shortly"; the next poll does)."""
        try:
            return self.order(order_id)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 503:
                return None
            raise

    def wait_final(
        self,
        order_ids: Iterable[str],
        timeout_s: float,
        progress: Callable[[int, int], None] | None = None,
        final: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Poll until every order (and its saga) is final or the time is up."""
        is_final = final or (lambda o: SagaState(o["saga"]["state"]).final)
        pending = list(order_ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        total = len(pending)
        while pending and time.monotonic() < deadline:
            still = []
            for order_id in pending:
                view = self._poll(order_id)
                if view is not None and is_final(view):
                    done[order_id] = view
                else:
                    still.append(order_id)
            pending = still
            if progress:
                progress(len(done), total)
            if pending:
                time.sleep(0.25)
        for order_id in pending:
            done[order_id] = self.order(order_id)
        return done

    def wait_returned(self, order_id: str, timeout_s: float) -> dict[str, Any]:
        """Poll until the order's latest return saga is final (or the time is up)."""

        def returned(view: dict[str, Any]) -> bool:
            return bool(view["returns"]) and SagaState(view["returns"][-1]["state"]).final

        return self.wait_final([order_id], timeout_s, final=returned)[order_id]
