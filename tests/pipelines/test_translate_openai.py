"""The real OpenAI-compatible client against the fake server (tests/fakes/openai_compat.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest

from pipelines.translate import openai_protocol as proto
from pipelines.translate.base import Translation, TranslationError, TranslationTimeout
from pipelines.translate.openai_compat import OpenAICompatTranslator
from tests.fakes.openai_compat import FakeOpenAI

KEY = "test-key"
TRANSLATIONS = {
    "I would like to make a payment": "Me gustaría hacer un pago",
    "hello": "hola",
    "Quiero pagar mi factura": "I want to pay my bill",
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(TRANSLATIONS, api_key=KEY) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatTranslator]:
    async with OpenAICompatTranslator(KEY, base_url=fake.base_url) as translator:
        yield translator


def messages_in_chain(exc: BaseException) -> list[str]:
    out, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return out


# -- round trip ------------------------------------------------------------------------------------


async def test_round_trip_sends_the_exact_request_shape(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    result = await client.translate("I would like to make a payment", "en", "es", deadline_s=5)

    assert isinstance(result, Translation)
    assert result.translated == "Me gustaría hacer un pago"
    assert (result.original, result.source_lang, result.target_lang, result.provider) == (
        "I would like to make a payment",
        "en",
        "es",
        "openai",
    )
    assert result.latency_ms > 0
    assert fake.paths == ["/v1/chat/completions"]
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"
    body = fake.requests[0]
    assert set(body) == {"model", "messages", "stream", "temperature"}
    assert body["model"] == "llama-3.1-8b-instant"
    assert body["stream"] is True and body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system" and "from English to Spanish" in system["content"]
    assert "only" in system["content"]
    assert user == {"role": "user", "content": "I would like to make a payment"}


async def test_spanish_to_english_and_region_codes(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    result = await client.translate("Quiero pagar mi factura", "es-MX", "EN", deadline_s=5)
    assert result.translated == "I want to pay my bill"
    assert (result.source_lang, result.target_lang) == ("es", "en")
    assert "from Spanish to English" in fake.requests[0]["messages"][0]["content"]


async def test_stream_translate_yields_several_deltas(client: OpenAICompatTranslator) -> None:
    async with contextlib.aclosing(
        client.stream_translate("I would like to make a payment", "en", "es", deadline_s=5)
    ) as stream:
        deltas = [d async for d in stream]
    assert len(deltas) > 3
    assert "".join(deltas) == "Me gustaría hacer un pago"


async def test_unsupported_pair_fails_without_a_request(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    assert client.supports("en", "es") and client.supports("es", "en")
    assert not client.supports("en", "en") and not client.supports("en", "xx")
    with pytest.raises(TranslationError, match="not supported"):
        await client.translate("hello", "en", "xx", deadline_s=5)
    assert fake.attempts == 0


# -- retries ---------------------------------------------------------------------------------------


async def test_429_with_retry_after_waits_that_long_then_succeeds(
    fake: FakeOpenAI, client: OpenAICompatTranslator
) -> None:
    fake.fail_next(1, 429, retry_after="1")
    t0 = time.monotonic()
    result = await client.translate("hello", "en", "es", deadline_s=5)
    elapsed = time.monotonic() - t0
    assert result.translated == "hola"
    assert fake.attempts == 2
    assert 0.95 <= fake.request_times[1] - fake.request_times[0] < 1.5
    assert elapsed < 1.6


async def test_retry_after_ms_is_preferred_over_retry_after(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    fake.fail_next(1, 429, retry_after="30", retry_after_ms="150")
    result = await client.translate("hello", "en", "es", deadline_s=5)
    assert result.translated == "hola"
    assert 0.14 <= fake.request_times[1] - fake.request_times[0] < 0.6


async def test_three_503_then_success_backs_off_exponentially(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    fake.fail_next(3, 503)
    result = await client.translate("hello", "en", "es", deadline_s=10)
    assert result.translated == "hola"
    assert fake.attempts == 4
    gaps = [b - a for a, b in zip(fake.request_times, fake.request_times[1:], strict=False)]
    for n, gap in enumerate(gaps):  # 0.5 s x 2^n, jitter 0.75-1
        assert 0.75 * 0.5 * 2**n - 0.02 <= gap <= 0.5 * 2**n + 0.3, gaps


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502])
async def test_retryable_statuses_are_retried(fake: FakeOpenAI, client: OpenAICompatTranslator, status: int) -> None:
    fake.fail_next(1, status, retry_after_ms="10")
    assert (await client.translate("hello", "en", "es", deadline_s=5)).translated == "hola"
    assert fake.attempts == 2


async def test_retries_exhausted_is_an_error_naming_the_last_status(fake: FakeOpenAI) -> None:
    fake.fail_next(3, 500, retry_after_ms="10")
    async with OpenAICompatTranslator(KEY, base_url=fake.base_url, max_retries=2) as client:
        with pytest.raises(TranslationError, match="giving up after 3 attempts.*HTTP 500") as info:
            await client.translate("hello", "en", "es", deadline_s=5)
    assert not isinstance(info.value, TranslationTimeout)
    assert fake.attempts == 3


async def test_deadline_shorter_than_retry_after_times_out_at_once(
    fake: FakeOpenAI, client: OpenAICompatTranslator
) -> None:
    fake.fail_next(1, 429, retry_after="5")
    t0 = time.monotonic()
    with pytest.raises(TranslationTimeout, match="less than the 5.000 s wait"):
        await client.translate("hello", "en", "es", deadline_s=1.0)
    assert time.monotonic() - t0 < 0.5
    assert fake.attempts == 1


async def test_connection_refused_is_retried_but_never_past_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with OpenAICompatTranslator(KEY, base_url=f"http://127.0.0.1:{port}/v1") as client:
        t0 = time.monotonic()
        with pytest.raises(TranslationTimeout):
            await client.translate("hello", "en", "es", deadline_s=1.0)
        assert time.monotonic() - t0 < 1.05


async def test_stalled_server_times_out_at_the_deadline(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    fake.stall_next(1, 5.0)
    t0 = time.monotonic()
    with pytest.raises(TranslationTimeout):
        await client.translate("hello", "en", "es", deadline_s=0.3)
    assert 0.28 <= time.monotonic() - t0 < 0.6


# -- errors that are not retried ---------------------------------------------------------------------


async def test_401_fails_at_once_and_the_key_appears_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    secret = "gsk_live_7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c1e"
    caplog.set_level(logging.DEBUG)
    async with FakeOpenAI(TRANSLATIONS, api_key=KEY, echo_key_in_401=True) as server:
        client = OpenAICompatTranslator(secret, base_url=server.base_url)
        try:
            t0 = time.monotonic()
            with pytest.raises(TranslationError) as info:
                await client.translate("hello", "en", "es", deadline_s=5)
            assert time.monotonic() - t0 < 0.5
        finally:
            await client.aclose()
        assert server.attempts == 1  # no retry
    assert not isinstance(info.value, TranslationTimeout)
    assert "HTTP 401" in str(info.value) and "Invalid API Key" in str(info.value)
    assert "[redacted]" in str(info.value)  # the fake echoed the key; the client cut it out
    for text in messages_in_chain(info.value) + [caplog.text, repr(client)]:
        assert secret not in text
    for record in caplog.records:
        assert secret not in record.getMessage()


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_client_errors_fail_at_once_with_the_provider_message(
    fake: FakeOpenAI, client: OpenAICompatTranslator, status: int
) -> None:
    fake.fail_next(1, status, retry_after="0")
    with pytest.raises(TranslationError, match=f"HTTP {status}: fake {status}"):
        await client.translate("hello", "en", "es", deadline_s=5)
    assert fake.attempts == 1


async def test_error_event_mid_stream_is_an_error(fake: FakeOpenAI, client: OpenAICompatTranslator) -> None:
    fake.error_mid_stream_next()
    with pytest.raises(TranslationError, match="error in stream: fake upstream failure"):
        await client.translate("I would like to make a payment", "en", "es", deadline_s=5)
    assert fake.attempts == 1
    # The connection was dropped, not reused half-read: the next request works.
    assert (await client.translate("hello", "en", "es", deadline_s=5)).translated == "hola"


@pytest.mark.parametrize(("kind", "message"), [("json", "not JSON"), ("shape", "choices")])
async def test_malformed_chunk_is_an_error(
    fake: FakeOpenAI, client: OpenAICompatTranslator, kind: str, message: str
) -> None:
    fake.malformed_next(1, kind)
    with pytest.raises(TranslationError, match=f"malformed stream chunk.*{message}"):
        await client.translate("I would like to make a payment", "en", "es", deadline_s=5)
    assert fake.attempts == 1


# -- concurrency -----------------------------------------------------------------------------------


async def test_concurrency_bound_holds(fake: FakeOpenAI) -> None:
    fake.delta_delay_s = 0.01
    texts = [f"sentence number {i}" for i in range(12)]
    async with OpenAICompatTranslator(KEY, base_url=fake.base_url, max_concurrency=3) as client:
        results = await asyncio.gather(*(client.translate(t, "en", "es", deadline_s=10) for t in texts))
    assert [r.translated for r in results] == [t.upper() for t in texts]
    assert fake.max_in_flight == 3


async def test_waiting_for_a_slot_counts_against_the_deadline(fake: FakeOpenAI) -> None:
    fake.stall_next(1, 0.8)
    async with OpenAICompatTranslator(KEY, base_url=fake.base_url, max_concurrency=1) as client:
        first = asyncio.create_task(client.translate("hello", "en", "es", deadline_s=5))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(TranslationTimeout, match="request slot"):
            await client.translate("hello", "en", "es", deadline_s=0.2)
        assert time.monotonic() - t0 < 0.4
        assert fake.attempts == 1
        assert (await first).translated == "hola"


# -- the protocol, without I/O ---------------------------------------------------------------------


def test_sse_decoder_handles_split_lines_crlf_comments_and_multiline_data() -> None:
    decoder = proto.SSEDecoder()
    stream = b': keep-alive\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: x\ndata: [DONE]\n\n'
    events: list[str] = []
    for i in range(len(stream)):  # one byte at a time: every split point
        events += decoder.feed(stream[i : i + 1])
    assert events == ['{"a":\n1}', "[DONE]"]


def test_sse_decoder_bounds_an_event() -> None:
    decoder = proto.SSEDecoder(max_event_bytes=100)
    with pytest.raises(TranslationError, match="over 100 bytes"):
        decoder.feed(b"data: " + b"x" * 200)


def test_parse_chunk() -> None:
    assert proto.parse_chunk("[DONE]") is proto.DONE
    assert proto.parse_chunk('{"choices":[{"index":0,"delta":{"content":"hola"}}]}') == "hola"
    assert proto.parse_chunk('{"choices":[{"delta":{"role":"assistant"}}]}') == ""
    assert proto.parse_chunk('{"choices":[],"x_groq":{"usage":{}}}') == ""
    with pytest.raises(TranslationError, match="rate limited"):
        proto.parse_chunk('{"error":{"message":"rate limited","type":"tokens"}}')
    with pytest.raises(TranslationError, match=r"choices\.0\.delta\.content"):
        proto.parse_chunk('{"choices":[{"delta":{"content":5}}]}')
    with pytest.raises(TranslationError, match="not JSON"):
        proto.parse_chunk('{"choices":')


def test_retry_after_parsing() -> None:
    assert proto.retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert proto.retry_after_s({"retry-after": "2"}) == 2.0
    assert proto.retry_after_s({"retry-after": "61"}) is None
    assert proto.retry_after_s({"retry-after": "-1"}) is None
    assert proto.retry_after_s({"retry-after-ms": "junk", "retry-after": "3"}) == 3.0
    date = "Wed, 21 Oct 2015 07:28:10 GMT"
    assert proto.retry_after_s({"retry-after": date}, now=1445412490.0) == pytest.approx(0.0, abs=0.01)
    assert proto.retry_after_s({}) is None
    # Unbounded, for callers with their own cap (the summary engine): far, past, unreadable.
    assert proto.requested_wait_s({"retry-after": "3600"}) == 3600.0
    assert proto.requested_wait_s({"retry-after": date}, now=1445412500.0) == pytest.approx(-10.0, abs=0.01)
    assert proto.requested_wait_s({"retry-after": "soon"}) is None and proto.requested_wait_s({}) is None


def test_backoff_doubles_from_half_a_second_up_to_eight() -> None:
    assert [proto.backoff_s(n, jitter=0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert proto.backoff_s(0, jitter=1) == 0.375


def test_redact_removes_the_key_and_bounds_the_message() -> None:
    assert proto.redact("bad key sk-abc", "sk-abc") == "bad key [redacted]"
    assert len(proto.redact("x" * 1000, "k")) == proto.MAX_MESSAGE_CHARS + 3


# -- redaction markers -----------------------------------------------------------------------------

MARKED = "my number is [REDACTED:phone] and my card [REDACTED:card]."


def _es(text: str) -> str:
    return f"ES({text})"


async def test_the_prompt_asks_for_the_markers_and_a_faithful_answer_is_taken_as_is() -> None:
    async with FakeOpenAI(api_key=KEY, transform=_es) as fake, \
            OpenAICompatTranslator(KEY, base_url=fake.base_url) as client:
        result = await client.translate(MARKED, "en", "es", deadline_s=5)
    assert result.translated == _es(MARKED) and client.marker_fallbacks == 0
    assert len(fake.requests) == 1
    assert "[REDACTED:...] exactly as written" in fake.requests[0]["messages"][0]["content"]


@pytest.mark.parametrize("how", ["translate", "drop", "swap"])
async def test_an_answer_that_spoils_a_marker_is_redone_between_the_markers_with_the_originals(how: str) -> None:
    async with FakeOpenAI(api_key=KEY, transform=_es) as fake, \
            OpenAICompatTranslator(KEY, base_url=fake.base_url) as client:
        fake.mangle_markers_next(1, how)
        result = await client.translate(MARKED, "en", "es", deadline_s=5)
    assert result.translated == "ES(my number is) [REDACTED:phone] ES(and my card) [REDACTED:card]."
    assert client.marker_fallbacks == 1
    # The whole text once, then each piece with words in it (the final "." is not sent); none has a marker.
    sent = [r["messages"][-1]["content"] for r in fake.requests]
    assert sent[0] == MARKED and sorted(sent[1:]) == ["and my card", "my number is"]


async def test_a_marker_at_the_start_survives_the_fallback_and_markers_alone_are_not_sent() -> None:
    async with FakeOpenAI(api_key=KEY, transform=_es) as fake, \
            OpenAICompatTranslator(KEY, base_url=fake.base_url) as client:
        fake.mangle_markers_next(1, "translate")
        start = await client.translate("[REDACTED:ssn] is my social", "en", "es", deadline_s=5)
        alone = await client.translate("[REDACTED:email].", "en", "es", deadline_s=5)
    assert start.translated == "[REDACTED:ssn] ES(is my social)"
    assert alone.translated == "[REDACTED:email]." and len(fake.requests) == 2
    assert client.marker_fallbacks == 1


async def test_a_model_that_invents_markers_even_piece_by_piece_fails_the_translation() -> None:
    async with FakeOpenAI(api_key=KEY, transform=_es) as fake, \
            OpenAICompatTranslator(KEY, base_url=fake.base_url) as client:
        fake.mangle_markers_next(4, "invent")
        with pytest.raises(TranslationError, match="redaction markers"):
            await client.translate(MARKED, "en", "es", deadline_s=5)
    assert (client.marker_fallbacks, client.markers_lost) == (1, 1)
