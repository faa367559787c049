"""The summary engines (``pipelines/summary_engine.py``) against the fake OpenAI-compatible server
(tests/fakes/openai_compat.py): the model's summary when all goes well; the offline one, with its
reason counted, when the answer is unusable, the server says no, waits too long or is not there."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import date
from typing import Any

import orjson
import pytest

from api.settings import Settings
from pipelines.redaction import Redactor
from pipelines.summary import summarize
from pipelines.summary_engine import LlmEngine, OfflineEngine, make_engine
from tests.fakes.openai_compat import FakeOpenAI
from tests.servers import free_port

KEY = "sk-test-summary-key-0123456789"
CARD = "4111 1111 1111 1111"
CALL_DATE = date(2026, 11, 30)
LINES = [("outbound", "Hello, this is an attempt to collect a debt."),
         ("inbound", f"My card is {CARD}."),  # a stored line that escaped redaction: the canary
         ("inbound", "I can pay 120.50 on Friday.")]
ANSWER: dict[str, Any] = {"summary": "The agent gave the disclosure; the consumer promised 120.50 for Friday.",
                          "disclosure_spoken": True, "promise_to_pay": {"amount": "120.50", "date": "2026-12-04"},
                          "dispute": False, "callback_requested": False}


def answering(answer: Any) -> Any:
    text = answer if isinstance(answer, str) else orjson.dumps(answer).decode()
    return lambda _user: text


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY, transform=answering(ANSWER)) as server:
        yield server


def engine(fake: FakeOpenAI | str, **over: Any) -> LlmEngine:
    base = fake if isinstance(fake, str) else fake.base_url
    kw: dict[str, Any] = {"base_url": base, "model": "test-model", "timeout_s": 5.0, "max_retries": 2,
                          "retry_after_max_s": 2.0, **over}
    return LlmEngine(KEY, redactor=Redactor(), **kw)


async def run(e: LlmEngine, lines: list[tuple[str, str]] = LINES) -> Any:
    try:
        return await e.summarize(lines, call_date=CALL_DATE)
    finally:
        await e.aclose()


def offline() -> Any:
    return summarize([(t, Redactor().redact(x).text) for t, x in LINES])


async def test_the_model_writes_it_from_redacted_lines_only(fake: FakeOpenAI) -> None:
    e = engine(fake)
    s = await run(e)
    assert (s.engine, s.model, s.provider, s.fallback) == ("llm", "test-model", "openai", None)
    assert s.text == ANSWER["summary"]
    assert s.score == {"disclosure_spoken": True, "promise_to_pay": {"amount": "120.50", "date": "2026-12-04"},
                       "dispute": False, "callback_requested": False, "consumer_lines": 2, "agent_lines": 1}
    # The canary: the raw card number left the process as a marker, never as digits.
    [body] = fake.requests
    sent = orjson.dumps(body).decode()
    assert "My card is [REDACTED:card]." in body["messages"][1]["content"]
    assert "4111" not in sent and "1111 1111" not in sent
    assert body["response_format"] == {"type": "json_object"} and body["stream"] is False
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert e.stats()["summaries_llm"] == 1 and e.stats()["summary_fallbacks"] == 0


async def test_a_number_in_the_models_answer_is_redacted_before_it_is_returned(fake: FakeOpenAI) -> None:
    fake.transform = answering({**ANSWER, "summary": f"The consumer read out card {CARD}."})
    e = engine(fake)
    s = await run(e)
    assert s.engine == "llm" and s.text == "The consumer read out card [REDACTED:card]."
    assert e.stats()["summary_output_redactions"] == 1


@pytest.mark.parametrize(("answer", "reason"), [
    ("Sure! The call went well.", "not_json"),
    ({**ANSWER, "dispute": "no"}, "invalid"),
    ({**ANSWER, "promise_to_pay": {"amount": "$120", "date": "2026-12-04"}}, "invalid"),
    ({**ANSWER, "promise_to_pay": {"amount": "120.50", "date": "next Friday"}}, "invalid"),
])
async def test_an_unusable_answer_gives_the_offline_summary_and_is_counted(
        fake: FakeOpenAI, answer: Any, reason: str) -> None:
    fake.transform = answering(answer)
    e = engine(fake)
    s = await run(e)
    want = offline()
    assert (s.engine, s.model, s.text, s.score, s.provider) == ("offline", None, want.text, want.score, "rules")
    assert s.fallback is not None and s.fallback.startswith(f"{reason}: ")
    stats = e.stats()
    assert stats["summary_fallbacks"] == 1 and stats["summary_fallback_reasons"] == {reason: 1}
    assert stats["summaries_offline"] == 1 and stats["summaries_llm"] == 0 and fake.attempts == 1


async def test_a_truncated_or_malformed_answer_falls_back(fake: FakeOpenAI) -> None:
    fake.truncate_next(1)
    fake.malformed_next(1, "json")
    fake.malformed_next(1, "shape")
    e = engine(fake)
    try:
        reasons = [(await e.summarize(LINES, call_date=CALL_DATE)).fallback for _ in range(3)]
        assert [r.split(":")[0] for r in reasons if r] == ["truncated", "malformed", "malformed"]
        assert (await e.summarize(LINES, call_date=CALL_DATE)).engine == "llm"  # faults spent: the model again
    finally:
        await e.aclose()
    assert e.stats()["summary_fallback_reasons"] == {"truncated": 1, "malformed": 2}


async def test_429_then_success_waits_what_retry_after_says(fake: FakeOpenAI) -> None:
    fake.fail_next(1, 429, retry_after="1")
    e = engine(fake)
    s = await run(e)
    assert s.engine == "llm" and fake.attempts == 2
    assert 0.95 <= fake.request_times[1] - fake.request_times[0] < 1.6
    assert e.stats()["summary_retries"] == 1 and e.stats()["summary_requests"] == 2


async def test_a_retry_after_beyond_the_cap_is_not_waited_for(fake: FakeOpenAI) -> None:
    fake.fail_next(1, 429, retry_after="30")
    e = engine(fake, retry_after_max_s=2.0)
    t0 = time.monotonic()
    s = await run(e)
    assert time.monotonic() - t0 < 1 and fake.attempts == 1
    assert s.engine == "offline" and s.fallback == "unavailable: HTTP 429, Retry-After beyond 2 s"


async def test_an_unreadable_or_past_retry_after_means_the_backoff_or_at_once(fake: FakeOpenAI) -> None:
    fake.fail_next(1, 429, retry_after="soon")
    fake.fail_next(1, 503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    e = engine(fake)
    s = await run(e)
    assert s.engine == "llm" and fake.attempts == 3
    gaps = [b - a for a, b in zip(fake.request_times, fake.request_times[1:], strict=False)]
    assert 0.3 <= gaps[0] < 1.0 and gaps[1] < 0.3  # the first backoff (0.375-0.5 s), then no wait


async def test_retries_are_bounded_then_the_offline_summary(fake: FakeOpenAI) -> None:
    fake.fail_next(5, 503, retry_after_ms="10")
    e = engine(fake, max_retries=2)
    s = await run(e)
    assert fake.attempts == 3 and s.engine == "offline"
    assert s.fallback == "unavailable: HTTP 503 on all 3 attempts"
    assert e.stats()["summary_fallback_reasons"] == {"unavailable": 1}


async def test_a_stalled_server_times_out_into_the_offline_summary(fake: FakeOpenAI) -> None:
    fake.stall_next(1, 10.0)
    e = engine(fake, timeout_s=0.5)
    t0 = time.monotonic()
    s = await run(e)
    assert time.monotonic() - t0 < 1.5
    assert s.engine == "offline" and s.fallback is not None and s.fallback.startswith("timeout: ")
    assert e.stats()["summary_fallback_reasons"] == {"timeout": 1}


async def test_a_refusal_is_not_retried_and_the_key_never_shows() -> None:
    async with FakeOpenAI(api_key="another-key", echo_key_in_401=True) as fake:
        e = engine(fake)
        s = await run(e)
    assert fake.attempts == 1 and s.engine == "offline" and s.fallback == "refused: HTTP 401"
    assert KEY not in repr(e) and KEY not in str(e.stats())


async def test_nobody_listening_is_unavailable_after_the_retries() -> None:
    e = engine(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    s = await run(e)
    assert s.engine == "offline" and s.fallback is not None and s.fallback.startswith("unavailable: connection")
    assert e.stats()["summary_requests"] == 2


async def test_nothing_said_sends_nothing(fake: FakeOpenAI) -> None:
    e = engine(fake)
    s = await run(e, [("inbound", "  ")])
    assert s.text == "Nothing was said." and s.engine == "offline" and s.fallback is None and fake.attempts == 0


async def test_the_offline_engine_redacts_what_it_quotes() -> None:
    s = await OfflineEngine(Redactor()).summarize(LINES, call_date=CALL_DATE)
    assert "[REDACTED:card]" in s.text and "4111" not in s.text and s.engine == "offline"


def test_which_engine_the_settings_choose() -> None:
    r = Redactor()
    assert isinstance(make_engine(Settings(summary="auto", openai_api_key=None), r), OfflineEngine)
    chosen = make_engine(Settings(summary="auto", openai_api_key=KEY, openai_model="m-a"), r)  # type: ignore[arg-type]
    assert isinstance(chosen, LlmEngine) and chosen.model == "m-a"
    chosen = make_engine(Settings(summary="llm", openai_api_key=KEY, summary_model="m-b"), r)  # type: ignore[arg-type]
    assert isinstance(chosen, LlmEngine) and chosen.model == "m-b"
    assert isinstance(make_engine(Settings(summary="offline", openai_api_key=KEY), r),  # type: ignore[arg-type]
                      OfflineEngine)
    with pytest.raises(ValueError, match="GROQ_API_KEY or OPENAI_API_KEY"):
        make_engine(Settings(summary="llm", openai_api_key=None), r)
