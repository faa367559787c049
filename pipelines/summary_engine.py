"""Which engine writes a call's summary and score, and the HTTP half of the model's.

``make_engine(settings, redactor)`` picks by ``SWITCHBOARD_SUMMARY`` (``Settings.summary``)::

    setting   key (GROQ_API_KEY / OPENAI_API_KEY)   engine
    offline   any                                  OfflineEngine: the rules of pipelines/summary.py
    auto      unset                                OfflineEngine
    auto      set                                  LlmEngine
    llm       set                                  LlmEngine
    llm       unset                                ValueError at start-up (a configuration error)

Both take the call's stored lines, which are redacted when written, and redact them again before any
use (``Redactor`` is idempotent on redacted text): the offline rules quote lines, the model is sent
them.  ``LlmEngine`` never raises for the provider's failures: whatever goes wrong, the call gets the
offline result, marked with the reason (``Summary.fallback``) and counted in ``fallbacks``::

    reason        when
    timeout       no answer within ``timeout_s`` (all attempts and waits together), or a wait the
                  server asked for would end past it
    unavailable   connection failures or 408/409/429/5xx on every attempt (``max_retries`` + 1), or
                  a Retry-After longer than ``retry_after_max_s``
    refused       any other status (400, 401, 403, 404, 413, 422 ...): retrying cannot help
    malformed, truncated, not_json, invalid
                  the answer broke the rules of ``pipelines.summary_protocol``

Transport (one ``POST {base_url}/chat/completions`` per call, ``stream: false``): retryable statuses
and connection failures are retried up to ``max_retries`` times, waiting what the server names in
``retry-after-ms``/``retry-after`` (a date already past: no wait; longer than ``retry_after_max_s``:
no retry, ``unavailable``), or when it names nothing readable 0.5 s x 2^n, capped at 8 s, jittered
(the translator's policy, ``openai_protocol.backoff_s``).  A 200 body larger than
``MAX_RESPONSE_BYTES`` is malformed.  The key is sent in ``Authorization`` only and cut out of every
message logged; ``Summary.fallback`` holds the reason and a rule or a status, never provider text.

Bounds: one request in flight per engine and call (the post-call worker runs
``post_call_workers`` jobs at once); at most ``max_retries`` + 1 attempts and ``timeout_s`` per call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson

from pipelines import summary_protocol as proto
from pipelines.redaction import Redactor
from pipelines.summary import Summary, summarize
from pipelines.translate import openai_protocol as wire

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger("switchboard.summary")

MAX_RESPONSE_BYTES = 256 * 1024
_ERROR_BODY_LIMIT = 64 * 1024
MAX_FALLBACK_CHARS = 200  # call_summaries.fallback (migration 0018)


class SummaryEngine(Protocol):
    name: str

    async def summarize(self, lines: Sequence[tuple[str, str]], *, call_date: date) -> Summary: ...

    def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class SummaryCounters:
    llm: int = 0  # summaries the model wrote
    offline: int = 0  # summaries the rules wrote, fallbacks included
    fallbacks: Counter[str] = field(default_factory=Counter)  # by reason
    attempts: int = 0  # HTTP requests sent
    retries: int = 0
    output_redactions: int = 0  # markers put into model-written summaries (a number it repeated or invented)

    def as_dict(self) -> dict[str, Any]:
        return {"summaries_llm": self.llm, "summaries_offline": self.offline,
                "summary_fallbacks": sum(self.fallbacks.values()), "summary_fallback_reasons": dict(self.fallbacks),
                "summary_requests": self.attempts, "summary_retries": self.retries,
                "summary_output_redactions": self.output_redactions}


def redacted_lines(lines: Sequence[tuple[str, str]], redactor: Redactor) -> list[tuple[str, str]]:
    return [(track, redactor.redact(text).text) for track, text in lines]


class OfflineEngine:
    name = "offline"

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.counters = SummaryCounters()

    async def summarize(self, lines: Sequence[tuple[str, str]], *, call_date: date) -> Summary:
        self.counters.offline += 1
        return summarize(redacted_lines(lines, self.redactor))

    def stats(self) -> dict[str, Any]:
        return {"summary_engine": self.name, **self.counters.as_dict()}

    async def aclose(self) -> None:
        pass


class LlmEngine:
    """The model's summary through an OpenAI-compatible chat-completions API; see the module docstring."""

    name = "llm"
    provider = "openai"

    def __init__(self, api_key: str, *, redactor: Redactor, base_url: str = "https://api.groq.com/openai/v1",
                 model: str = "llama-3.1-8b-instant", timeout_s: float = 30.0, max_retries: int = 2,
                 retry_after_max_s: float = 10.0, session: aiohttp.ClientSession | None = None) -> None:
        if not api_key:
            raise ValueError("api_key is empty")
        if timeout_s <= 0 or max_retries < 0 or retry_after_max_s < 0:
            raise ValueError("timeout_s must be positive, max_retries and retry_after_max_s not negative")
        self._key = api_key
        self._url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.redactor = redactor
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_after_max_s = retry_after_max_s
        self.counters = SummaryCounters()
        self._session = session
        self._own_session = session is None

    def __repr__(self) -> str:
        return f"LlmEngine(url={self._url!r}, model={self.model!r})"

    def stats(self) -> dict[str, Any]:
        return {"summary_engine": self.name, "summary_model": self.model, **self.counters.as_dict()}

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def summarize(self, lines: Sequence[tuple[str, str]], *, call_date: date) -> Summary:
        lines = redacted_lines(lines, self.redactor)
        offline = summarize(lines)
        if not any(text.strip() for _, text in lines):
            self.counters.offline += 1
            return offline  # nothing to send: "Nothing was said." needs no model
        # request_body redacts every line once more itself: no path sends text it has not redacted.
        body = proto.request_body(self.model, lines, call_date=call_date, redactor=self.redactor)
        try:
            raw = await self._post(orjson.dumps(body))
            verdict = proto.parse_response(raw, call_date=call_date, requested_model=self.model)
        except proto.Rejected as exc:
            self.counters.offline += 1
            self.counters.fallbacks[exc.reason] += 1
            log.warning("summary.fallback", extra={"reason": exc.reason, "detail": wire.redact(exc.detail, self._key)})
            reason = wire.redact(f"{exc.reason}: {exc.detail}", self._key)[:MAX_FALLBACK_CHARS]
            return Summary(offline.text, offline.score, offline.provider, "offline", None, reason)
        text, score, masked = proto.score(verdict, lines, self.redactor)
        self.counters.llm += 1
        self.counters.output_redactions += masked
        if masked:
            log.warning("summary.output_redacted", extra={"markers": masked, "model": verdict.model})
        return Summary(text, score, self.provider, "llm", verdict.model)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No aiohttp timeouts: timeout_s bounds the whole exchange.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _post(self, body: bytes) -> bytes:
        """The body of a 200 answer, or ``Rejected`` with a transport reason."""
        session = self._get_session()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        retries = 0
        while True:
            self.counters.attempts += 1
            wait: float | None = None
            try:
                async with asyncio.timeout_at(deadline), session.post(self._url, data=body, headers=headers) as resp:
                    if resp.status == 200:
                        return await _read_capped(resp)
                    error_body = await resp.content.read(_ERROR_BODY_LIMIT)
                    status, answer_headers = resp.status, resp.headers
            except TimeoutError:
                raise proto.Rejected("timeout", f"no answer within {self.timeout_s:g} s "
                                                f"(attempt {retries + 1})") from None
            except aiohttp.ClientError as exc:
                problem = f"connection failed ({type(exc).__name__})"
            else:
                problem = f"HTTP {status}"
                log.warning("summary.http_error", extra={
                    "status": status, "error": wire.redact(wire.error_body_message(error_body), self._key)})
                if not wire.is_retryable(status):
                    raise proto.Rejected("refused", problem)
                asked = wire.requested_wait_s(answer_headers)
                if asked is not None and asked > self.retry_after_max_s:
                    # Sooner than asked would be refused again; later than the cap holds the job up.
                    raise proto.Rejected("unavailable", f"{problem}, Retry-After beyond {self.retry_after_max_s:g} s")
                wait = None if asked is None else max(asked, 0.0)  # a date already past: at once
            if retries >= self.max_retries:
                raise proto.Rejected("unavailable", f"{problem} on all {retries + 1} attempts")
            if wait is None:
                wait = wire.backoff_s(retries)
            if loop.time() + wait >= deadline:
                raise proto.Rejected("timeout", f"{problem}; a {wait:.3f} s wait would pass the deadline")
            retries += 1
            self.counters.retries += 1
            log.info("summary.retry", extra={"problem": problem, "retry": retries, "wait_s": round(wait, 3)})
            await asyncio.sleep(wait)


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
    # read(n) may return less than is there: keep reading until the cap or the end.
    while len(body) <= MAX_RESPONSE_BYTES and not resp.content.at_eof():
        more = await resp.content.read(MAX_RESPONSE_BYTES + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > MAX_RESPONSE_BYTES:
        raise proto.Rejected("malformed", f"the answer is over {MAX_RESPONSE_BYTES} bytes")
    return body


def make_engine(settings: Settings, redactor: Redactor) -> SummaryEngine:
    """The engine ``settings`` name (the module docstring's table)."""
    choice = settings.summary
    key = settings.openai_api_key
    if choice == "auto":
        choice = "llm" if key is not None else "offline"
    if choice == "offline":
        return OfflineEngine(redactor)
    if key is None:
        raise ValueError("SWITCHBOARD_SUMMARY=llm needs GROQ_API_KEY or OPENAI_API_KEY")
    return LlmEngine(key.get_secret_value(), redactor=redactor, base_url=settings.openai_base_url,
                     model=settings.summary_model or settings.openai_model, timeout_s=settings.summary_timeout_s,
                     max_retries=settings.summary_max_retries, retry_after_max_s=settings.summary_retry_after_max_s)
