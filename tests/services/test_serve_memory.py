"""Memory of the stream service under steady input: Kafka fetch responses do not pile up between collections.

kafka-python leaves a reference cycle behind each time ``poll()`` times out waiting for a fetch, and that cycle
holds the fetch responses (record bytes included). With torch loaded, CPython's own full collections come too
rarely to free them, so the service collects on a schedule; this checks that after one of its collections the
process holds no more fetch responses than the few a consumer has in flight.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

#: Fetch responses a consumer can legitimately hold right after a collection: the one broker's response in flight
#: or not yet drained, and those of the few polls between the service's collection and the count below.
MAX_LIVE_FETCH_RESPONSES = 2


def fetch_responses() -> int:
    """Fetch responses the collector still tracks: reachable ones and garbage not yet collected."""
    from kafka.protocol.consumer.fetch import FetchResponse

    return sum(1 for obj in gc.get_objects() if isinstance(obj, FetchResponse))


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_fetch_responses_do_not_accumulate_while_serving(broker, topics, unit_factory, service_config, run_service,
                                                         publish):
    rng = np.random.default_rng(5)
    units = [unit_factory(i, rng) for i in range(150)]
    with run_service(service_config(), broker.bootstrap) as service:
        # a steady rate: the service polls (and times out) between units, as in production
        publish(units, topics, rate=15.0)
        wait_until(lambda: service.stats.decisions_acked == len(units), what="decisions")
        collections = service.stats.gc_collections
        wait_until(lambda: service.stats.gc_collections > collections, what="the service's next collection")
        live = fetch_responses()
    assert service.stats.gc_collections >= 1
    assert live <= MAX_LIVE_FETCH_RESPONSES, (
        f"{live} kafka fetch responses alive after the service's collection; expected at most "
        f"{MAX_LIVE_FETCH_RESPONSES} (in flight)")
