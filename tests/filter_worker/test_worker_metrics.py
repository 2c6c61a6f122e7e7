"""The pipeline's hook feeds the per-filter histogram and error counter."""

from __future__ import annotations

from prometheus_client import REGISTRY

from warden.policy.verdict import ContentClass, FilterOutcome
from warden_filter_worker.metrics import observe_outcome


def test_the_pipeline_hook_observes_each_outcome() -> None:
    def sample(suffix: str, **labels: str) -> float:
        value = REGISTRY.get_sample_value(f"warden_filter_seconds{suffix}", labels)
        return value or 0.0

    count, total = sample("_count", filter="test_hooked"), sample("_sum", filter="test_hooked")
    fast = sample("_bucket", filter="test_hooked", le="0.001")
    errors = REGISTRY.get_sample_value("warden_filter_errors_total", {"filter": "test_hooked"})

    observe_outcome(FilterOutcome("test_hooked", ContentClass.NEUTRAL, duration_ms=0.5))
    observe_outcome(FilterOutcome("test_hooked", ContentClass.NEUTRAL, (), "Boom: x", 2500.0))

    assert sample("_count", filter="test_hooked") == count + 2
    assert abs(sample("_sum", filter="test_hooked") - total - 2.5005) < 1e-9
    assert sample("_bucket", filter="test_hooked", le="0.001") == fast + 1
    assert sample("_bucket", filter="test_hooked", le="+Inf") == count + 2
    after = REGISTRY.get_sample_value("warden_filter_errors_total", {"filter": "test_hooked"})
    assert after == (errors or 0) + 1
