"""Prohibited verdicts are counted by harm, with a bounded label set."""

from __future__ import annotations

from prometheus_client import REGISTRY

from warden.policy.harms import SPAM, SPAM_FLOODING
from warden_filter_worker.metrics import count_harms


def harm_count(harm: str) -> float:
    return REGISTRY.get_sample_value("warden_verdict_harms_total", {"harm": harm}) or 0.0


def test_each_harm_of_a_verdict_is_counted_and_unknown_ids_share_one_label() -> None:
    spam, flooding, unknown = harm_count(SPAM), harm_count(SPAM_FLOODING), harm_count("unknown")
    count_harms((SPAM, SPAM_FLOODING))
    count_harms(("com.example.made_up",))
    assert harm_count(SPAM) == spam + 1
    assert harm_count(SPAM_FLOODING) == flooding + 1
    assert harm_count("unknown") == unknown + 1
    assert (
        REGISTRY.get_sample_value("warden_verdict_harms_total", {"harm": "com.example.made_up"})
        is None
    )
