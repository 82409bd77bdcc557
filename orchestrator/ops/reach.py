"""Can this process reach its database and its broker? A one-line answer, never a traceback.

The CLI checks what a command needs before it starts (and maps a connection lost midway the same
way), so an unreachable service is its own exit code (3) with the URL it tried, password hidden.
"""

from __future__ import annotations

import psycopg
import sqlalchemy as sa
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

TIMEOUT_S = 3.0


class Unreachable(RuntimeError):
    """The database or the broker did not answer."""

    def __init__(self, service: str, url: str, reason: object) -> None:
        lines = str(reason).strip().splitlines()
        super().__init__(
            f"cannot reach the {service} at {url}: {lines[0] if lines else type(reason).__name__}"
        )
        self.service = service


def database_url_shown(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def broker_url_shown(url: str) -> str:
    return ";".join(str(maybe_sanitize_url(part)) for part in url.split(";"))


def require_database(url: str, server_only: bool = False) -> None:
    """Connect once; ``server_only`` asks the server alone (for a database about to be created)."""
    target = sa.make_url(url).set(drivername="postgresql")
    if server_only:
        target = target.set(database="postgres")
    try:
        psycopg.connect(
            target.render_as_string(hide_password=False), connect_timeout=int(TIMEOUT_S)
        ).close()
    except psycopg.Error as exc:
        raise Unreachable("database", database_url_shown(url), exc) from None


def require_broker(url: str) -> None:
    try:
        with Connection(url, connect_timeout=TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=TIMEOUT_S)
    except Exception as exc:  # kombu raises its own and the socket's errors alike
        raise Unreachable("broker", broker_url_shown(url), exc) from None


PUBLISH_TIMEOUT_S = 10.0  # a busy shared broker confirms within a second or two; a stuck one never


def require_publish(url: str, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
    """A broker that accepts connections may still not confirm publishes (seen: a node holding
    hundreds of leftover queues timed every confirm out): one publish must be confirmed within
    ``timeout_s``. The message goes to the default exchange under a name no queue has: dropped."""
    import time

    import amqp

    try:
        with Connection(url, connect_timeout=timeout_s,
                        transport_options={"confirm_publish": False}) as kconn:
            kconn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            channel = kconn.connection.channel()
            channel.confirm_select()
            answered: list[bool] = []
            channel.events["basic_ack"].add(lambda *_: answered.append(True))
            channel.events["basic_nack"].add(lambda *_: answered.append(False))
            channel.basic_publish(amqp.Message(b"reach probe"), exchange="",
                                  routing_key="sagactl.reach-probe", mandatory=False)
            deadline = time.monotonic() + timeout_s
            while not answered:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no publisher confirm within {timeout_s:.0f}s")
                kconn.connection.drain_events(timeout=remaining)
            if not answered[0]:
                raise RuntimeError("the broker refused a publish (nack)")
    except Exception as exc:  # kombu, py-amqp and the socket raise their own errors alike
        raise Unreachable("broker", broker_url_shown(url), exc) from None
