"""``sagactl bench`` that cannot reach its broker or its database fails within seconds, naming
which, with the contract's exit code 3, instead of waiting out its timeout (seen: a warm-up that
printed "final 0/20" for five minutes while every publish timed out)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator.ops.config import settings
from orchestrator.ops.processes import sagactl
from orchestrator.proof.harness import free_port

# `sagactl bench` starts its own sandbox and processes, not the session's shared system.
pytestmark = pytest.mark.own_system

UNREACHABLE = 3


class SilentProxy:
    """A TCP proxy to the real broker that can go silent: once frozen it forwards nothing and
    answers nothing, on old and new connections alike (a broker that accepts and never
    confirms). The machine's RabbitMQ itself is never touched."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self.frozen.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(self.target)
            self._sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.frozen.is_set():
                    return  # held: neither side hears from the other again
                dst.sendall(data)

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def proxy() -> Iterator[SilentProxy]:
    url = settings().sandbox_broker_url
    authority = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = authority.partition(":")
    running = SilentProxy((host or "127.0.0.1", int(port or 5672)))
    yield running
    running.close()


def _bench(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        sagactl("bench", "-n", "20", "--warmup", "20", "--concurrency", "4", "--timeout", "300",
                *args),
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("service, variable, url", [
    ("broker", "SAGA_SANDBOX_BROKER_URL", "amqp://guest:guest@127.0.0.1:{port}//"),
    ("database", "SAGA_SANDBOX_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:{port}/x"),
])
def test_a_bench_whose_service_is_not_there_fails_at_once_naming_it(
    service: str, variable: str, url: str
) -> None:
    began = time.monotonic()
    bench = _bench({variable: url.format(port=free_port())})
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == UNREACHABLE, err[-3000:]
    assert f"cannot reach the {service}" in err
    assert time.monotonic() - began < 60


def test_a_broker_that_goes_silent_mid_run_fails_the_bench_in_seconds(
    proxy: SilentProxy,
) -> None:
    bench = _bench({"SAGA_SANDBOX_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}//"})
    lines: list[str] = []
    warm_up = threading.Event()

    def read() -> None:
        assert bench.stderr is not None
        for line in bench.stderr:
            lines.append(line)
            if line.startswith("[saga warm-up]"):
                warm_up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert warm_up.wait(400), "".join(lines)[-3000:]  # a busy machine starts slowly
    proxy.frozen.set()
    frozen_at = time.monotonic()
    try:
        bench.wait(timeout=400)
    finally:
        if bench.poll() is None:
            bench.kill()
    reader.join(10)
    err = "".join(lines)
    # The stall is noticed after 10 s, the probe takes up to 10 s, the teardown some more: less
    # than the 300 s the warm-up would otherwise wait.
    assert time.monotonic() - frozen_at < 90, err[-3000:]
    assert bench.returncode == UNREACHABLE, err[-3000:]
    assert "cannot reach the broker" in err, err[-3000:]
