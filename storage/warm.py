"""The warm tier on Redis (or Valkey): sessions, rate limits, idempotency records, a short API cache,
and per-call event streams. Everything here may be lost; PostgreSQL is the system of record.

Keys (``p`` is the prefix, default ``"sb:"``), each with its TTL and its bound:

- ``p sess:<sha256(token)>``: session record; ``session_ttl_s`` (7 d), slid by ``use_session``; <= 4 KiB.
- ``p usess:<user_id>``: sorted set of the user's session hashes -> expiry; ``session_ttl_s``, refreshed
  on every write; <= ``max_user_sessions`` (100) members, one more revokes the oldest.
- ``p rl:<window_s>:<key>``: one counter; ``window_s`` from the window's first hit.
- ``p lock:<key>``: a lock-out (e.g. an account after too many failed logins); its own TTL.
- ``p idem:<org_id>:<key>``: idempotency record; ``lock_ttl_s`` (60 s) while running, then
  ``idempotency_ttl_s`` (24 h) with the response; key <= 255 chars, body <= 1 MiB.
- ``p cache:<key>``: cached bytes; ``cache_ttl_s`` (30 s) or per call; <= 1 MiB.
- ``p ev:<call_id>``: a call's event stream; 24 h from its first event (so a crashed node's stream still
  goes), ``ended_ttl_s`` (1 h) after ``EventBus.end``; ``MAXLEN ~ max_len`` (2000) entries of <= 64 KiB.

Session tokens never reach Redis: the key is ``sha256(token)``, so a dump holds no usable token.
``usess`` is a sorted set (hash -> expiry time) rather than a plain set, so that expired members can be
pruned and the oldest session evicted when a user passes the cap.

Errors: bad arguments raise ``ValueError`` before any I/O; anything from the server or the connection
is ``redis.exceptions.RedisError`` (``ConnectionError``, ``TimeoutError``, ...), passed through.
The client must speak RESP2 and return bytes (``protocol=2``, ``decode_responses=False``: the defaults).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

log = logging.getLogger("switchboard.storage.warm")

MAX_KEY_CHARS = 512
MAX_SESSION_BYTES = 4096
MAX_IDEM_KEY_CHARS = 255
MAX_FINGERPRINT_CHARS = 256
MAX_RESPONSE_BYTES = 1 << 20
MAX_CACHE_BYTES = 1 << 20
MAX_EVENT_BYTES = 64 << 10
MAX_READ_COUNT = 10_000
STREAM_LIVE_TTL_S = 86400
_STREAM_ID = re.compile(r"\d+(-\d+)?")

# INCR and the window's expiry in one step; also repairs a counter that somehow lost its TTL.
_RATE_LUA = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""
# Claim the key, or return what holds it: one round trip, no gap between the SET NX and the GET.
_IDEM_BEGIN_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"""
# Only a running claim may be freed; a stored response stays for its 24 h.
_IDEM_ABANDON_LUA = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['state'] == 'running' then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Session:
    user_id: str
    org_id: str
    role: str
    data: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # whole seconds until the window resets (ceil), for Retry-After / RateLimit-Reset


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class IdemBegin:
    kind: Literal["new", "replay", "in_progress", "mismatch"]
    response: StoredResponse | None = None  # set only for "replay"


@dataclass(frozen=True, slots=True)
class BusEvent:
    id: str
    event: str
    payload: dict[str, Any]
    ref: int | None = None  # the publisher's own id for the event (the SSE id on the node that owns the call)


def _text(name: str, value: str, max_chars: int = MAX_KEY_CHARS) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > max_chars:
        raise ValueError(f"{name} is longer than {max_chars} characters")
    return value


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _bytes_client(client: aioredis.Redis) -> aioredis.Redis:
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("decode_responses") or str(kwargs.get("protocol") or 2) != "2":
        raise ValueError("the Redis client must use RESP2 (the default) and decode_responses=False")
    return client


def _hash_token(token: str) -> str:
    return hashlib.sha256(_text("token", token).encode()).hexdigest()


class WarmStore:
    """Sessions, rate limits, idempotency and a cache under one prefix. See the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "sb:", session_ttl_s: int = 7 * 86400,
                 idempotency_ttl_s: int = 86400, cache_ttl_s: int = 30, max_user_sessions: int = 100) -> None:
        self._r = _bytes_client(redis)
        self._p = _text("prefix", prefix, 64)
        self._session_ttl = _positive("session_ttl_s", session_ttl_s)
        self._idem_ttl = _positive("idempotency_ttl_s", idempotency_ttl_s)
        self._cache_ttl = _positive("cache_ttl_s", cache_ttl_s)
        self._max_user_sessions = _positive("max_user_sessions", max_user_sessions)
        self._owns_client = False
        self._rate = redis.register_script(_RATE_LUA)
        self._idem_begin = redis.register_script(_IDEM_BEGIN_LUA)
        self._idem_abandon = redis.register_script(_IDEM_ABANDON_LUA)

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 32, socket_timeout_s: float = 10.0,
                 pool_wait_s: float = 5.0, **kw: Any) -> WarmStore:
        """A store that owns its client: at most ``max_connections``; a caller waits up to ``pool_wait_s``
        for a free one, then gets ``ConnectionError``. ``EventBus.read`` must block for less than
        ``socket_timeout_s``."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_wait_s, socket_timeout=socket_timeout_s,
            socket_connect_timeout=min(socket_timeout_s, 5.0), health_check_interval=30)
        store = cls(aioredis.Redis.from_pool(pool), **kw)
        store._owns_client = True
        return store

    @property
    def redis(self) -> aioredis.Redis:
        """The client, to share its pool with an ``EventBus``."""
        return self._r

    async def aclose(self) -> None:
        """Close the client and its pool if ``from_url`` made them; an injected client is the caller's."""
        if self._owns_client:
            await self._r.aclose()

    async def ping(self) -> None:
        await self._r.ping()

    # -- sessions ----------------------------------------------------------------------------------

    def _sess_key(self, token_hash: str) -> str:
        return f"{self._p}sess:{token_hash}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._p}usess:{user_id}"

    async def create_session(self, *, user_id: str, org_id: str, role: str, data: dict[str, Any] | None = None) -> str:
        """Store a new session and return its token. Only ``sha256(token)`` is stored; the caller must hand
        the token to the client and never log it. Past ``max_user_sessions`` the oldest session is revoked."""
        record = orjson.dumps({"user_id": _text("user_id", user_id), "org_id": _text("org_id", org_id),
                               "role": _text("role", role), "data": data or {}, "created_at": time.time()})
        if len(record) > MAX_SESSION_BYTES:
            raise ValueError(f"session record is {len(record)} bytes, over {MAX_SESSION_BYTES}")
        token = secrets.token_urlsafe(32)
        token_hash = _hash_token(token)
        user_key, now = self._user_key(user_id), time.time()
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._sess_key(token_hash), record, ex=self._session_ttl)
            pipe.zadd(user_key, {token_hash: now + self._session_ttl})
            pipe.zremrangebyscore(user_key, "-inf", now)
            pipe.expire(user_key, self._session_ttl)
            pipe.zrange(user_key, 0, -(self._max_user_sessions + 1))
            *_, overflow = await pipe.execute()
        if overflow:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(*(self._sess_key(h.decode()) for h in overflow))
                pipe.zrem(user_key, *overflow)
                await pipe.execute()
        return token

    async def get_session(self, token: str) -> Session | None:
        raw = await self._r.get(self._sess_key(_hash_token(token)))
        if raw is None:
            return None
        rec = orjson.loads(raw)
        return Session(rec["user_id"], rec["org_id"], rec["role"], rec["data"], rec["created_at"])

    async def touch_session(self, token: str) -> bool:
        """Restart the session's TTL (sliding expiry). False if it does not exist (expired or revoked)."""
        return await self.use_session(token) is not None

    async def use_session(self, token: str) -> Session | None:
        """The session, its TTL restarted (sliding expiry), in two round trips: what a request needs."""
        token_hash = _hash_token(token)
        raw = await self._r.getex(self._sess_key(token_hash), ex=self._session_ttl)
        if raw is None:
            return None
        rec = orjson.loads(raw)
        user_key = self._user_key(rec["user_id"])
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zadd(user_key, {token_hash: time.time() + self._session_ttl}, xx=True)
            pipe.expire(user_key, self._session_ttl)
            await pipe.execute()
        return Session(rec["user_id"], rec["org_id"], rec["role"], rec["data"], rec["created_at"])

    async def revoke_session(self, token: str) -> bool:
        token_hash = _hash_token(token)
        raw = await self._r.getdel(self._sess_key(token_hash))
        if raw is None:
            return False
        await self._r.zrem(self._user_key(orjson.loads(raw)["user_id"]), token_hash)
        return True

    async def revoke_user_sessions(self, user_id: str) -> int:
        """Revoke every live session of ``user_id``; returns how many there were. Atomic against a
        concurrent ``create_session`` for the same user (WATCH on the user's index)."""
        user_key = self._user_key(_text("user_id", user_id))

        async def revoke(pipe: Any) -> None:
            hashes = await pipe.zrange(user_key, 0, -1)
            pipe.multi()
            pipe.delete(user_key, *(self._sess_key(h.decode()) for h in hashes))

        (deleted,) = await self._r.transaction(revoke, user_key)
        return max(0, int(deleted) - 1)  # the index itself was one of them whenever it held a hash

    # -- rate limits -------------------------------------------------------------------------------

    async def hit_rate_limit(self, key: str, limit: int, window_s: int = 60) -> RateDecision:
        """Count one hit in the fixed window that starts at the key's first hit. Denied hits count too."""
        _text("key", key)
        _positive("limit", limit)
        _positive("window_s", window_s)
        count, ttl_ms = await self._rate(keys=[f"{self._p}rl:{window_s}:{key}"], args=[window_s * 1000])
        count = int(count)
        return RateDecision(allowed=count <= limit, limit=limit, remaining=max(0, limit - count),
                            reset_s=max(1, math.ceil(int(ttl_ms) / 1000)))

    async def reset_rate_limit(self, key: str, window_s: int = 60) -> None:
        """Forget the window's count for ``key`` (e.g. an account's failed logins after a success)."""
        await self._r.delete(f"{self._p}rl:{_positive('window_s', window_s)}:{_text('key', key)}")

    async def lock(self, key: str, ttl_s: int) -> None:
        """Hold a lock-out named ``key`` for ``ttl_s`` seconds (``p lock:<key>``; a new one restarts it)."""
        await self._r.set(f"{self._p}lock:{_text('key', key)}", b"1", ex=_positive("ttl_s", ttl_s))

    async def locked_for(self, key: str) -> int:
        """Whole seconds (ceil) the lock-out ``key`` still holds; 0 when there is none."""
        ttl_ms = int(await self._r.pttl(f"{self._p}lock:{_text('key', key)}"))
        return math.ceil(ttl_ms / 1000) if ttl_ms > 0 else 0

    # -- idempotency -------------------------------------------------------------------------------

    def _idem_key(self, org_id: str, key: str) -> str:
        _text("org_id", org_id)
        if ":" in org_id:
            raise ValueError("org_id must not contain ':'")  # keeps (org, key) -> Redis key one-to-one
        return f"{self._p}idem:{org_id}:{_text('idempotency key', key, MAX_IDEM_KEY_CHARS)}"

    @staticmethod
    def _fingerprint(fingerprint: str) -> bytes:
        if not _text("fingerprint", fingerprint, MAX_FINGERPRINT_CHARS).isascii():
            raise ValueError("fingerprint must be ASCII (a hex or base64 digest)")
        return fingerprint.encode()

    async def idem_begin(self, org_id: str, key: str, fingerprint: str, lock_ttl_s: int = 60) -> IdemBegin:
        """Claim ``key`` for this request. "new": run the handler, then call ``idem_complete`` (or
        ``idem_abandon`` if it fails without a response); the claim lapses after ``lock_ttl_s``.
        "replay": send ``response``. "in_progress": 409, retry later. "mismatch": 422, key reused."""
        redis_key, fp = self._idem_key(org_id, key), self._fingerprint(fingerprint)
        _positive("lock_ttl_s", lock_ttl_s)
        running = orjson.dumps({"state": "running", "fp": fingerprint})
        raw = await self._idem_begin(keys=[redis_key], args=[running, lock_ttl_s])
        if raw is None:
            return IdemBegin("new")
        rec = orjson.loads(raw)
        if not hmac.compare_digest(rec["fp"].encode(), fp):
            return IdemBegin("mismatch")
        if rec["state"] == "running":
            return IdemBegin("in_progress")
        return IdemBegin("replay", StoredResponse(rec["status"], rec["headers"], base64.b64decode(rec["body"])))

    async def idem_complete(self, org_id: str, key: str, fingerprint: str, response: StoredResponse) -> None:
        """Store the first response (any status, 5xx included) for ``idempotency_ttl_s``. It is not stored
        if the key now belongs to a different request (our claim lapsed and another took it) or already
        holds a response: the first one wins."""
        redis_key, fp = self._idem_key(org_id, key), self._fingerprint(fingerprint)
        if not 100 <= response.status <= 599:
            raise ValueError(f"status {response.status} is not an HTTP status")
        if len(response.body) > MAX_RESPONSE_BYTES:
            raise ValueError(f"response body is {len(response.body)} bytes, over {MAX_RESPONSE_BYTES}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in response.headers.items()):
            raise ValueError("response headers must be str -> str")
        done = orjson.dumps({"state": "done", "fp": fingerprint, "status": response.status,
                             "headers": response.headers, "body": base64.b64encode(response.body).decode()})

        async def store(pipe: Any) -> bool:
            current = await pipe.get(redis_key)
            if current is not None:
                rec = orjson.loads(current)
                if rec["state"] != "running" or not hmac.compare_digest(rec["fp"].encode(), fp):
                    return False
            pipe.multi()
            pipe.set(redis_key, done, ex=self._idem_ttl)
            return True

        if not await self._r.transaction(store, redis_key, value_from_callable=True):
            log.warning("idempotency.complete_skipped", extra={"org_id": org_id})

    async def idem_abandon(self, org_id: str, key: str) -> None:
        """Free a running claim (the handler failed before it had a response); a stored response stays."""
        await self._idem_abandon(keys=[self._idem_key(org_id, key)])

    # -- cache -------------------------------------------------------------------------------------

    async def cache_get(self, key: str) -> bytes | None:
        value: Any = await self._r.get(f"{self._p}cache:{_text('key', key)}")
        return value

    async def cache_set(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        if not isinstance(value, bytes | bytearray | memoryview) or len(value) > MAX_CACHE_BYTES:
            raise ValueError(f"value must be bytes of at most {MAX_CACHE_BYTES}")
        ttl = self._cache_ttl if ttl_s is None else _positive("ttl_s", ttl_s)
        await self._r.set(f"{self._p}cache:{_text('key', key)}", bytes(value), ex=ttl)

    async def cache_invalidate(self, key: str) -> None:
        await self._r.delete(f"{self._p}cache:{_text('key', key)}")


def _bus_event(eid: bytes, fields: dict[bytes, bytes]) -> BusEvent:
    ref = fields.get(b"ref")
    return BusEvent(eid.decode(), fields[b"event"].decode(), orjson.loads(fields[b"data"]),
                    int(ref) if ref is not None else None)


class EventBus:
    """Cross-node transcript events on Redis Streams: one stream per call, capped (MAXLEN ~ max_len, default
    2000) and expired (TTL after the call ends, default 1 h; 24 h after the first event if ``end`` never comes).

    A reader resumes with the last id it saw; if ``first_id`` is newer than that id, entries were trimmed
    and the reader has a gap. Do not publish after ``end``: the stream would still expire on the short TTL.
    """

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "sb:", max_len: int = 2000,
                 ended_ttl_s: int = 3600) -> None:
        self._r = _bytes_client(redis)
        self._p = _text("prefix", prefix, 64)
        self._max_len = _positive("max_len", max_len)
        self._ended_ttl = _positive("ended_ttl_s", ended_ttl_s)

    def _key(self, call_id: str) -> str:
        return f"{self._p}ev:{_text('call_id', call_id)}"

    async def purge(self, call_id: str) -> bool:
        """Delete the call's stream (an erasure: its events may quote the person); True if it existed."""
        return bool(await self._r.delete(self._key(call_id)))

    async def publish(self, call_id: str, event: str, payload: dict[str, Any] | bytes, *,
                      ref: int | None = None) -> str:
        """Append one event (payload as a dict, or already JSON-encoded); returns its stream id
        ("1700000000000-0").  ``ref`` is the publisher's own id for the event, handed back by ``read``."""
        key = self._key(call_id)
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        if len(data) > MAX_EVENT_BYTES:
            raise ValueError(f"payload is {len(data)} bytes, over {MAX_EVENT_BYTES}")
        fields: dict[Any, Any] = {"event": _text("event", event, 128), "data": data}
        if ref is not None:
            fields["ref"] = str(int(ref))
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields, maxlen=self._max_len, approximate=True)
            pipe.expire(key, STREAM_LIVE_TTL_S, nx=True)  # only the first event sets it; end() shortens it
            entry_id, _ = await pipe.execute()
        return str(entry_id.decode())

    async def read(self, call_id: str, after: str = "0-0", *, count: int = 100,
                   block_ms: int | None = None) -> list[BusEvent]:
        """Up to ``count`` events with ids after ``after``, oldest first. With ``block_ms``, wait that long
        for the first one (it must be shorter than the client's socket timeout); [] on timeout."""
        key = self._key(call_id)
        if not isinstance(after, str) or not _STREAM_ID.fullmatch(after):
            raise ValueError(f"after must be a stream id like '1700000000000-0', got {after!r}")
        if not 0 < count <= MAX_READ_COUNT:
            raise ValueError(f"count must be in 1..{MAX_READ_COUNT}")
        if block_ms is not None:
            _positive("block_ms", block_ms)
            socket_timeout = self._r.connection_pool.connection_kwargs.get("socket_timeout")
            if socket_timeout is not None and block_ms >= socket_timeout * 1000 - 500:
                raise ValueError(f"block_ms must be at least 0.5 s below the socket timeout ({socket_timeout} s)")
        result: Any = await self._r.xread({key: after}, count=count, block=block_ms)  # RESP2: [[key, entries]]
        return [_bus_event(eid, fields) for _, entries in result or [] for eid, fields in entries]

    async def read_many(self, positions: dict[str, str], *, count: int = 100,
                        block_ms: int | None = None) -> list[tuple[str, BusEvent]]:
        """``read`` over several calls in one command: ``positions`` maps call id -> last id read.

        Returns (call id, event) pairs, each call's in order; at most ``count`` per call.
        """
        if not positions:
            raise ValueError("positions must name at least one call")
        if not 0 < count <= MAX_READ_COUNT:
            raise ValueError(f"count must be in 1..{MAX_READ_COUNT}")
        streams: dict[Any, Any] = {}
        calls: dict[bytes, str] = {}
        for call_id, after in positions.items():
            if not isinstance(after, str) or not _STREAM_ID.fullmatch(after):
                raise ValueError(f"after must be a stream id like '1700000000000-0', got {after!r}")
            key = self._key(call_id)
            streams[key] = after
            calls[key.encode()] = call_id
        if block_ms is not None:
            _positive("block_ms", block_ms)
        result: Any = await self._r.xread(streams, count=count, block=block_ms)
        return [(calls[key], _bus_event(eid, fields)) for key, entries in result or [] for eid, fields in entries]

    async def last_ref(self, call_id: str) -> int:
        """The publisher's id of the newest retained event (0 if none): a node finishing another's call
        (api.recovery) numbers its ``call.ended`` after it, so Last-Event-ID keeps working."""
        entries: Any = await self._r.xrevrange(self._key(call_id), "+", "-", count=1)
        ref = entries[0][1].get(b"ref") if entries else None
        return int(ref) if ref is not None else 0

    async def end(self, call_id: str) -> None:
        """The call is over: the stream stays readable for ``ended_ttl_s``, then expires."""
        await self._r.expire(self._key(call_id), self._ended_ttl)

    async def has_entry(self, call_id: str, entry_id: str) -> bool:
        """Whether the call's stream still holds ``entry_id`` (a relay's last position): after Redis came
        back, False means what was there is gone (a restart without persistence, a flush)."""
        if not _STREAM_ID.fullmatch(entry_id):
            raise ValueError(f"entry_id must be a stream id like '1700000000000-0', got {entry_id!r}")
        entries: Any = await self._r.xrange(self._key(call_id), entry_id, entry_id, count=1)
        return bool(entries)

    async def server_run(self) -> str:
        """The Redis server's run id: it changes when the server restarts."""
        info: Any = await self._r.info("server")
        return str(info.get("run_id", b"")) if isinstance(info, dict) else ""

    async def first_id(self, call_id: str) -> str | None:
        """The oldest retained id, or None if the stream is empty or gone."""
        entries: Any = await self._r.xrange(self._key(call_id), "-", "+", count=1)
        return entries[0][0].decode() if entries else None
