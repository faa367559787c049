"""Translation through an OpenAI-compatible chat-completions API (Groq by default), streamed.

One request per text: ``POST {base_url}/chat/completions`` with a system prompt naming the two
languages and the text as the user message, ``stream: true``, ``temperature: 0``.  The wire rules
(SSE parsing, chunk shapes, retry policy) live in ``openai_protocol``; this module moves bytes.

Contract:

* Everything counts against the caller's deadline: waiting for one of the ``max_concurrency``
  request slots, each attempt, each backoff, the whole stream.  A slot is held across the retries
  of one request, so a rate-limited provider is not hit harder by the callers queued behind it.
* 408, 409, 429, >= 500 and connection failures before the response are retried up to
  ``max_retries`` times.  A backoff that would end past the deadline is not slept: the call raises
  ``TranslationTimeout`` at once.  Other statuses (400, 401, 403, 404, 422...) raise
  ``TranslationError`` at once with the provider's message.
* Redaction markers (``[REDACTED:phone]``, ``markers``): the prompt tells the model to copy them, and
  ``translate`` checks that the answer holds exactly the text's markers in order.  When it does not
  (a marker translated, dropped, doubled or moved), the pieces of text between the markers are
  translated one request each, concurrently, under the same deadline, and joined with the original
  markers; counted in ``marker_fallbacks``.  If even that answer fails the check (a model that
  invents a marker), ``TranslationError``, counted in ``markers_lost``.  A text of markers and
  punctuation alone is not sent.
  ``stream_translate`` yields the raw deltas, unchecked.
* Once a 200 stream has begun nothing is retried: an ``error`` event, a malformed chunk, or a stream
  that ends without ``[DONE]`` raise ``TranslationError``.
* The API key is sent in the ``Authorization`` header only; it is cut out of every message we raise
  or log (providers may echo it back in a 401), and ``repr()`` does not show it.
* An injected ``session`` is used as is and not closed; without one, a session is made on first use
  and closed by ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator

import aiohttp
import orjson

from pipelines.translate import markers
from pipelines.translate import openai_protocol as proto
from pipelines.translate.base import Translation, TranslationError, TranslationTimeout, Translator

log = logging.getLogger("switchboard.translate.openai")

_ERROR_BODY_LIMIT = 64 * 1024
_READ_SIZE = 16 * 1024


class OpenAICompatTranslator(Translator):
    name = "openai"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = "https://api.groq.com/openai/v1",
        model: str = "llama-3.1-8b-instant",
        max_concurrency: int = 8,
        session: aiohttp.ClientSession | None = None,
        max_retries: int = 4,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is empty")
        self._key = api_key
        self._url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._slots = asyncio.Semaphore(max_concurrency)
        self._session = session
        self._own_session = session is None
        self._max_retries = max_retries
        self._closed = False

    def __repr__(self) -> str:
        return f"OpenAICompatTranslator(url={self._url!r}, model={self.model!r})"

    def supports(self, source_lang: str, target_lang: str) -> bool:
        return source_lang != target_lang and {source_lang, target_lang} <= proto.LANGUAGE_NAMES.keys()

    async def start(self) -> None:
        self._get_session()

    async def aclose(self) -> None:
        self._closed = True
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TranslationError("openai: translator is closed")
        if self._session is None:
            # No aiohttp timeouts: the caller's deadline bounds every request.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _fail(self, message: str, timeout: bool = False) -> TranslationError:
        message = proto.redact(message, self._key)
        return TranslationTimeout(message) if timeout else TranslationError(message)

    async def translate(self, text: str, source_lang: str, target_lang: str, *, deadline_s: float) -> Translation:
        started = time.monotonic()
        src, tgt = self.check_pair(source_lang, target_lang)
        if markers.PLACEHOLDER.search(text) and not any(_wordy(p) for p in markers.split(text)[0]):
            return Translation(text, text, src, tgt, self.name, 0.0)  # markers and punctuation only
        translated = await self._complete(text, src, tgt, deadline_s)
        if not markers.kept(text, translated):
            self.marker_fallbacks += 1
            log.warning("openai: the answer changed the redaction markers; translating between them")
            pieces, found = markers.split(text)
            left = deadline_s - (time.monotonic() - started)
            done = await asyncio.gather(*(self._complete(p, src, tgt, left) if _wordy(p) else _same(p)
                                          for p in pieces))
            translated = markers.join(list(done), found)
            if not markers.kept(text, translated):
                self.markers_lost += 1
                raise TranslationError("openai: the answer changed the redaction markers, even piece by piece")
        return Translation(text, translated, src, tgt, self.name, (time.monotonic() - started) * 1000)

    async def _complete(self, text: str, src: str, tgt: str, deadline_s: float) -> str:
        parts: list[str] = []
        async with contextlib.aclosing(self.stream_translate(text, src, tgt, deadline_s=deadline_s)) as deltas:
            async for delta in deltas:
                parts.append(delta)
        return "".join(parts).strip()

    async def stream_translate(
        self, text: str, source_lang: str, target_lang: str, *, deadline_s: float
    ) -> AsyncGenerator[str, None]:
        """Yield the translation's text deltas as they arrive (raw, not stripped).

        Same errors and deadline as ``translate``.  Consume it inside ``contextlib.aclosing`` so
        that breaking out early closes the connection and frees the slot at once.
        """
        src, tgt = self.check_pair(source_lang, target_lang)
        session = self._get_session()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            message = f"openai: deadline of {deadline_s:.3f} s passed waiting for a request slot"
            raise self._fail(message, True) from None
        try:
            body = orjson.dumps(proto.request_body(self.model, text, src, tgt))
            resp = await self._open(session, body, deadline, deadline_s)
            done = False
            try:
                decoder = proto.SSEDecoder()
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await resp.content.read(_READ_SIZE)
                    except TimeoutError:
                        raise self._fail(f"openai: deadline of {deadline_s:.3f} s passed mid-stream", True) from None
                    except aiohttp.ClientError as exc:
                        raise self._fail(f"openai: stream broken: {exc!r}") from None
                    if not data:
                        raise self._fail("openai: stream ended before [DONE]")
                    for event in decoder.feed(data):
                        delta = proto.parse_chunk(event)
                        if delta is proto.DONE:
                            done = True
                            return
                        if delta:
                            yield str(delta)
            finally:
                if done:
                    resp.release()  # back to the pool if the body is complete, else closed
                else:
                    resp.close()
        finally:
            self._slots.release()

    async def _open(
        self, session: aiohttp.ClientSession, body: bytes, deadline: float, deadline_s: float
    ) -> aiohttp.ClientResponse:
        """The 200 response whose stream is to be read, after retries."""
        loop = asyncio.get_running_loop()
        headers = {
            "Authorization": f"Bearer {self._key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        retries = 0
        while True:
            wait: float | None
            try:
                async with asyncio.timeout_at(deadline) as scope:
                    resp = await session.post(self._url, data=body, headers=headers)
                    if resp.status == 200:
                        return resp
                    try:
                        error_body = await resp.content.read(_ERROR_BODY_LIMIT)
                    finally:
                        resp.close()
            except (TimeoutError, aiohttp.ClientError) as exc:
                if scope.expired():
                    message = f"openai: deadline of {deadline_s:.3f} s passed (attempt {retries + 1})"
                    raise self._fail(message, True) from None
                # Failed before any response (or an injected session's own timeout): retryable like a 5xx.
                problem = f"connection failed: {exc!r}"
                wait = None
            else:
                message = proto.error_body_message(error_body)
                problem = f"HTTP {resp.status}: {message}"
                if not proto.is_retryable(resp.status):
                    raise self._fail(f"openai: {problem}")
                wait = proto.retry_after_s(resp.headers)
            if retries >= self._max_retries:
                raise self._fail(f"openai: giving up after {retries + 1} attempts, last {problem}")
            if wait is None:
                wait = proto.backoff_s(retries)
            left = deadline - loop.time()
            if wait >= left:
                raise self._fail(
                    f"openai: deadline of {deadline_s:.3f} s leaves {max(left, 0):.3f} s, "
                    f"less than the {wait:.3f} s wait after {problem}",
                    True,
                )
            retries += 1
            log.warning("openai: %s; retry %d in %.3f s", proto.redact(problem, self._key), retries, wait)
            await asyncio.sleep(wait)


def _wordy(piece: str) -> bool:
    """Whether a piece between markers holds anything to translate (not just punctuation)."""
    return any(ch.isalnum() for ch in piece)


async def _same(piece: str) -> str:
    return piece
