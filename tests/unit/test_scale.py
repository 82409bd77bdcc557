"""``--scale`` and the cluster's ``BROKER_URL``: parsing and naming, no services."""

from __future__ import annotations

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
