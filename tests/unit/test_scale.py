"""``--scale`` and the cluster's ``BROKER_URL``: parsing and naming, no services."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.messaging.outbox import rotated
from orchestrator.ops.processes import ScaleError, base_name, instance_names, parse_scale


def test_scale_names_every_kind_with_its_count() -> None:
    assert parse_scale("orchestrator=2, relay=3") == {"orchestrator": 2, "relay": 3}
    assert parse_scale(None) == {} and parse_scale("") == {}


@pytest.mark.parametrize("bad", ["web=2", "nobody=2", "relay", "relay=0", "relay=two", "relay=-1"])
def test_scale_refuses_unknown_kinds_and_counts_below_one(bad: str) -> None:
    with pytest.raises(ScaleError):
        parse_scale(bad)


def test_instances_keep_the_table_order_and_number_the_twins() -> None:
    names = instance_names({"relay": 2, "beat": 3})
    assert names[:3] == ["web", "orchestrator", "relay"]
    assert names.count("relay#2") == 1 and "beat#3" in names and "beat#4" not in names
    assert [base_name(n) for n in names].count("beat") == 3


def test_a_publisher_can_start_at_any_node_of_a_cluster_url() -> None:
    url = "amqp://a//;amqp://b//;amqp://c//"
    assert rotated(url, 0) == url
    assert rotated(url, 1) == "amqp://b//;amqp://c//;amqp://a//"
    assert rotated(url, 5) == "amqp://c//;amqp://a//;amqp://b//"
    assert rotated("amqp://only//", 7) == "amqp://only//"


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], dict[str, Any]]]:
    """Set SAGA_QUEUE_REPLICAS, read the queue arguments the topology would declare."""
    from orchestrator.messaging.topology import dead_letter_queues, service_queues
    from orchestrator.ops.config import settings

    def arguments(value: str | None) -> dict[str, Any]:
        if value is None:
            monkeypatch.delenv("SAGA_QUEUE_REPLICAS", raising=False)
        else:
            monkeypatch.setenv("SAGA_QUEUE_REPLICAS", value)
        settings.cache_clear()
        return {
            **dict(service_queues()["payment"].queue_arguments or {}),
            "dead": dict(dead_letter_queues()["payment"].queue_arguments or {}),
        }

    yield arguments
    settings.cache_clear()


def test_replicas_go_to_every_quorum_queue(replicas: Any) -> None:
    declared = replicas("3")
    assert declared["x-quorum-initial-group-size"] == 3
    assert declared["dead"]["x-quorum-initial-group-size"] == 3


def test_unset_replicas_send_no_argument_so_older_queues_stay_acceptable(replicas: Any) -> None:
    # A queue declared before the setting existed has no such argument, and RabbitMQ refuses a
    # re-declaration that adds one (PRECONDITION_FAILED, seen on 3.10).
    declared = replicas(None)
    assert "x-quorum-initial-group-size" not in declared
    assert "x-quorum-initial-group-size" not in declared["dead"]


@pytest.mark.parametrize("bad", ["0", "-1", "three"])
def test_replicas_below_one_or_not_a_number_stop_the_process(replicas: Any, bad: str) -> None:
    from orchestrator.ops.config import ConfigError

    with pytest.raises(ConfigError):
        replicas(bad)
