"""The warm tier against a real Redis-protocol server (embedded Valkey, or ``REDIS_URL``).

Each test gets its own key prefix and deletes only that prefix afterwards, so tests can share a server
with other suites and with each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from storage.warm import EventBus, StoredResponse, WarmStore

DAY = 86400


@pytest.fixture
def prefix() -> str:
    return f"t{uuid4().hex[:8]}:"


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[WarmStore]:
    s = WarmStore.from_url(redis_url, prefix=prefix)
    yield s
    keys = [k async for k in s.redis.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await s.redis.delete(*keys)
    await s.aclose()


@pytest.fixture
def r(store: WarmStore) -> aioredis.Redis:
    return store.redis


@pytest.fixture
def bus(store: WarmStore, prefix: str) -> EventBus:
    return EventBus(store.redis, prefix=prefix)


async def dump(r: aioredis.Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` with its value, whatever the type, as bytes."""
    out: dict[bytes, bytes] = {}
    async for key in r.scan_iter(match=f"{prefix}*"):
        kind = (await r.type(key)).decode()
        if kind == "string":
            out[key] = await r.get(key)
        elif kind == "zset":
            out[key] = b" ".join(await r.zrange(key, 0, -1))
        else:
            out[key] = repr(await r.dump(key)).encode()
    return out


# -- sessions --------------------------------------------------------------------------------------


async def test_session_create_get_touch_revoke_round_trip(store: WarmStore) -> None:
    token = await store.create_session(user_id="u1", org_id="o1", role="agent", data={"lang": "en"})
    session = await store.get_session(token)
    assert session is not None
    assert (session.user_id, session.org_id, session.role, session.data) == ("u1", "o1", "agent", {"lang": "en"})
    assert abs(session.created_at - time.time()) < 5
    assert await store.touch_session(token) is True
    used = await store.use_session(token)  # what a request does: read and slide in one step
    assert used is not None and (used.user_id, used.role) == ("u1", "agent")
    assert await store.revoke_session(token) is True
    assert await store.use_session(token) is None
    assert await store.get_session(token) is None
    assert await store.touch_session(token) is False
    assert await store.revoke_session(token) is False
    assert await store.get_session("no-such-token") is None


async def test_session_stores_only_the_token_hash_with_a_seven_day_ttl(
        store: WarmStore, r: aioredis.Redis, prefix: str) -> None:
    token = await store.create_session(user_id="u1", org_id="o1", role="admin")
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    stored = await dump(r, prefix)
    assert f"{prefix}sess:{token_hash}".encode() in stored
    for key, value in stored.items():
        assert token.encode() not in key and token.encode() not in value
    for key in stored:
        assert 7 * DAY - 60 < await r.ttl(key) <= 7 * DAY


async def test_touch_session_restarts_the_ttl(store: WarmStore, r: aioredis.Redis, prefix: str) -> None:
    token = await store.create_session(user_id="u1", org_id="o1", role="agent")
    key = f"{prefix}sess:{hashlib.sha256(token.encode()).hexdigest()}"
    await r.expire(key, 100)
    assert await store.touch_session(token)
    assert await r.ttl(key) > 7 * DAY - 60


async def test_revoke_user_sessions_revokes_all_of_that_user_and_no_other(store: WarmStore) -> None:
    mine = [await store.create_session(user_id="alice", org_id="o1", role="agent") for _ in range(3)]
    theirs = await store.create_session(user_id="bob", org_id="o1", role="agent")
    await store.revoke_session(mine[0])
    assert await store.revoke_user_sessions("alice") == 2
    assert [await store.get_session(t) for t in mine] == [None, None, None]
    assert await store.get_session(theirs) is not None
    assert await store.revoke_user_sessions("alice") == 0


async def test_sessions_per_user_are_capped_by_evicting_the_oldest(redis_url: str, prefix: str) -> None:
    store = WarmStore.from_url(redis_url, prefix=prefix, max_user_sessions=3)
    try:
        tokens = [await store.create_session(user_id="u", org_id="o", role="agent") for _ in range(5)]
        alive = [await store.get_session(t) is not None for t in tokens]
        assert alive == [False, False, True, True, True]
        assert await store.redis.zcard(f"{prefix}usess:u") == 3
    finally:
        await store.revoke_user_sessions("u")
        await store.aclose()


async def test_session_inputs_are_validated(store: WarmStore) -> None:
    with pytest.raises(ValueError, match="user_id"):
        await store.create_session(user_id="", org_id="o", role="agent")
    with pytest.raises(ValueError, match="bytes"):
        await store.create_session(user_id="u", org_id="o", role="agent", data={"x": "y" * 5000})
    with pytest.raises(ValueError, match="token"):
        await store.get_session("")


# -- rate limits -----------------------------------------------------------------------------------


async def test_rate_limit_allows_the_limit_then_denies_until_the_window_ends(store: WarmStore) -> None:
    decisions = [await store.hit_rate_limit("ip:1", 5) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert all(d.limit == 5 and 0 < d.reset_s <= 60 for d in decisions)


async def test_rate_limit_allows_again_after_a_one_second_window(store: WarmStore) -> None:
    assert (await store.hit_rate_limit("k", 1, window_s=1)).allowed
    denied = await store.hit_rate_limit("k", 1, window_s=1)
    assert not denied.allowed and denied.reset_s == 1
    await asyncio.sleep(1.1)
    assert (await store.hit_rate_limit("k", 1, window_s=1)).allowed


async def test_rate_limit_is_exact_under_200_concurrent_hits(store: WarmStore) -> None:
    decisions = await asyncio.gather(*(store.hit_rate_limit("burst", 50) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50


async def test_rate_limit_inputs_are_validated(store: WarmStore) -> None:
    for key, limit, window in [("", 5, 60), ("k", 0, 60), ("k", -1, 60), ("k", 5, 0)]:
        with pytest.raises(ValueError):
            await store.hit_rate_limit(key, limit, window)


# -- idempotency -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 500])
async def test_idempotency_replays_the_first_response(store: WarmStore, status: int) -> None:
    assert (await store.idem_begin("org", "key-1", "fp-a")).kind == "new"
    first = StoredResponse(status, {"content-type": "application/json"}, b'{"id": 1}\x00\xff')
    await store.idem_complete("org", "key-1", "fp-a", first)
    again = await store.idem_begin("org", "key-1", "fp-a")
    assert again.kind == "replay" and again.response == first
    await store.idem_complete("org", "key-1", "fp-a", StoredResponse(200, {}, b"second"))
    assert (await store.idem_begin("org", "key-1", "fp-a")).response == first


async def test_idempotency_key_reused_with_another_request_is_a_mismatch(store: WarmStore) -> None:
    assert (await store.idem_begin("org", "k", "fp-a")).kind == "new"
    assert (await store.idem_begin("org", "k", "fp-b")).kind == "mismatch"
    await store.idem_complete("org", "k", "fp-a", StoredResponse(200))
    assert (await store.idem_begin("org", "k", "fp-b")).kind == "mismatch"


async def test_idempotency_concurrent_begins_yield_exactly_one_new(store: WarmStore) -> None:
    results = await asyncio.gather(*(store.idem_begin("org", "race", "fp") for _ in range(20)))
    assert Counter(b.kind for b in results) == {"new": 1, "in_progress": 19}


async def test_idempotency_keys_are_scoped_by_tenant(store: WarmStore) -> None:
    assert (await store.idem_begin("org-a", "same", "fp-a")).kind == "new"
    assert (await store.idem_begin("org-b", "same", "fp-b")).kind == "new"


async def test_idempotency_abandon_frees_a_running_key_but_not_a_stored_response(store: WarmStore) -> None:
    assert (await store.idem_begin("org", "k", "fp")).kind == "new"
    await store.idem_abandon("org", "k")
    assert (await store.idem_begin("org", "k", "fp-other")).kind == "new"
    await store.idem_complete("org", "k", "fp-other", StoredResponse(202))
    await store.idem_abandon("org", "k")
    assert (await store.idem_begin("org", "k", "fp-other")).kind == "replay"


async def test_idempotency_ttls_are_the_lock_then_24_hours(store: WarmStore, r: aioredis.Redis, prefix: str) -> None:
    await store.idem_begin("org", "k", "fp", lock_ttl_s=60)
    key = f"{prefix}idem:org:k"
    assert 50 < await r.ttl(key) <= 60
    await store.idem_complete("org", "k", "fp", StoredResponse(200, {}, b"ok"))
    assert DAY - 60 < await r.ttl(key) <= DAY


async def test_idempotency_inputs_are_validated(store: WarmStore) -> None:
    with pytest.raises(ValueError, match="255"):
        await store.idem_begin("org", "k" * 256, "fp")
    assert (await store.idem_begin("org", "k" * 255, "fp")).kind == "new"
    for org, key, fp in [("", "k", "fp"), ("o", "", "fp"), ("o", "k", ""), ("a:b", "k", "fp")]:
        with pytest.raises(ValueError):
            await store.idem_begin(org, key, fp)
    with pytest.raises(ValueError, match="status"):
        await store.idem_complete("org", "k", "fp", StoredResponse(42))


# -- cache -----------------------------------------------------------------------------------------


async def test_cache_set_get_invalidate(store: WarmStore, r: aioredis.Redis, prefix: str) -> None:
    assert await store.cache_get("calls:o1") is None
    await store.cache_set("calls:o1", b"[1,2,3]")
    assert await store.cache_get("calls:o1") == b"[1,2,3]"
    assert 0 < await r.ttl(f"{prefix}cache:calls:o1") <= 30
    await store.cache_invalidate("calls:o1")
    assert await store.cache_get("calls:o1") is None


async def test_cache_entries_expire(store: WarmStore) -> None:
    await store.cache_set("short", b"x", ttl_s=1)
    assert await store.cache_get("short") == b"x"
    await asyncio.sleep(1.1)
    assert await store.cache_get("short") is None


# -- event bus -------------------------------------------------------------------------------------


async def test_bus_reads_events_in_order_with_payloads_intact(bus: EventBus) -> None:
    payloads = [{"text": "hello", "final": False}, {"text": "hello world", "final": True}, {"n": [1, 2.5, None]}]
    ids = [await bus.publish("c1", f"transcript.{i}", p) for i, p in enumerate(payloads)]
    events = await bus.read("c1")
    assert [(e.id, e.event, e.payload) for e in events] == [
        (ids[i], f"transcript.{i}", payloads[i]) for i in range(3)]
    assert [e.id for e in await bus.read("c1", after=ids[1])] == [ids[2]]
    assert await bus.read("c1", after=ids[2]) == []


async def test_bus_blocking_read_is_woken_by_a_publish_from_another_node(
        bus: EventBus, redis_url: str, prefix: str) -> None:
    last = await bus.publish("c2", "call.started", {})
    other_node = WarmStore.from_url(redis_url, prefix=prefix)
    try:
        reader = asyncio.create_task(bus.read("c2", after=last, block_ms=5000))
        await asyncio.sleep(0.1)  # let XREAD reach the server first
        started = time.monotonic()
        await EventBus(other_node.redis, prefix=prefix).publish("c2", "transcript", {"text": "hi"})
        events = await asyncio.wait_for(reader, 1.0)
        assert time.monotonic() - started < 1.0
        assert [(e.event, e.payload) for e in events] == [("transcript", {"text": "hi"})]
    finally:
        await other_node.aclose()


async def test_bus_blocking_read_returns_empty_on_timeout(bus: EventBus) -> None:
    assert await bus.read("quiet", block_ms=100) == []


async def test_bus_stream_is_capped_and_first_id_moves_forward(store: WarmStore, prefix: str) -> None:
    bus = EventBus(store.redis, prefix=prefix, max_len=100)
    first = await bus.publish("c3", "e", {"i": 0})
    assert await bus.first_id("c3") == first
    for start in range(1, 5000, 500):
        await asyncio.gather(*(bus.publish("c3", "e", {"i": i}) for i in range(start, start + 500)))
    assert await store.redis.xlen(f"{prefix}ev:c3") <= 200
    oldest = await bus.first_id("c3")
    assert oldest is not None and tuple(map(int, oldest.split("-"))) > tuple(map(int, first.split("-")))
    assert await bus.first_id("never-published") is None


async def test_bus_stream_ttl_is_a_day_while_live_and_shortens_at_end(bus: EventBus, r: aioredis.Redis,
                                                                     prefix: str) -> None:
    await bus.publish("c4", "e", {})
    assert DAY - 60 < await r.ttl(f"{prefix}ev:c4") <= DAY
    await bus.end("c4")
    assert 3600 - 60 < await r.ttl(f"{prefix}ev:c4") <= 3600
    await bus.publish("c4", "late", {})
    assert await r.ttl(f"{prefix}ev:c4") <= 3600


async def test_bus_inputs_are_validated(bus: EventBus) -> None:
    with pytest.raises(ValueError):
        await bus.publish("", "e", {})
    with pytest.raises(ValueError, match="bytes"):
        await bus.publish("c", "e", {"x": "y" * 70_000})
    for kwargs in [{"after": "nope"}, {"count": 0}, {"block_ms": 0}, {"block_ms": 60_000}]:
        with pytest.raises(ValueError):
            await bus.read("c", **kwargs)  # type: ignore[arg-type]


async def test_clients_that_decode_responses_are_refused(redis_url: str) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            WarmStore(client)
    finally:
        await client.aclose()


async def test_a_relay_can_tell_a_restarted_server_and_a_position_that_is_gone(redis_url: str) -> None:
    """EventBus.server_run and has_entry: what api.relay asks after Redis comes back (tests/api/test_relay_reset.py)."""
    import uuid as _uuid

    import redis.asyncio as aioredis_

    from storage.warm import EventBus as Bus

    client = aioredis_.Redis.from_url(redis_url)
    try:
        bus = Bus(client, prefix=f"t{_uuid.uuid4().hex[:8]}:")
        run = await bus.server_run()
        assert run and run == await bus.server_run()  # the same server: the same run id
        first = await bus.publish("c", "call.started", {}, ref=1)
        assert await bus.has_entry("c", first) and not await bus.has_entry("c", "1-0")
        assert not await bus.has_entry("other", first)
        await bus.purge("c")
        assert not await bus.has_entry("c", first)  # gone with the stream, as after an empty restart
    finally:
        await client.aclose()
