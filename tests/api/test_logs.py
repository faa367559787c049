"""Log lines are bounded per event: a flood is held back, counted, and reported on the next line."""

from __future__ import annotations

import logging

import orjson

from api.logs import JsonFormatter, RateLimit


def record(msg: str, created: float, name: str = "switchboard.media") -> logging.LogRecord:
    r = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (), None)
    r.created = created
    return r


def test_a_flood_of_one_event_is_held_back_and_the_count_reported() -> None:
    limit = RateLimit(per_s=10, burst=5)
    passed = [limit.filter(record("stream.protocol_error", 100.0)) for _ in range(1000)]
    assert passed.count(True) == 5 and limit.suppressed == 995
    late = record("stream.protocol_error", 101.0)  # a second later: 10 more tokens
    assert limit.filter(late)
    assert orjson.loads(JsonFormatter().format(late))["suppressed"] == 995


def test_other_events_are_not_starved_by_a_flood() -> None:
    limit = RateLimit(per_s=10, burst=5)
    for _ in range(1000):
        limit.filter(record("stream.protocol_error", 100.0))
    assert limit.filter(record("call.started", 100.0))
    assert limit.filter(record("stream.protocol_error", 100.0, name="aiohttp.server"))


def test_tracked_events_are_bounded() -> None:
    limit = RateLimit(max_keys=50)
    for i in range(10_000):
        limit.filter(record(f"event-{i}", 100.0))
    assert len(limit._buckets) == 50
