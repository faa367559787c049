"""The model summary's wire rules (``pipelines/summary_protocol.py``), no I/O: what is sent (redacted by
construction, bounded) and every rule an answer is held to, each rejection with its reason."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import orjson
import pytest

from pipelines import summary_protocol as proto
from pipelines.redaction import Redactor
from pipelines.summary import summarize

CALL_DATE = date(2026, 11, 30)  # a Monday
CARD = "4111 1111 1111 1111"
R = Redactor()
GOOD: dict[str, Any] = {"summary": "The consumer promised to pay 120.50 on Friday.", "disclosure_spoken": True,
                        "promise_to_pay": {"amount": "120.50", "date": "2026-12-04"}, "dispute": False,
                        "callback_requested": False}


def completion(content: str, *, finish: str | None = "stop", model: Any = "llama-3.1-8b-instant") -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": finish}]})


def parse(answer: Any, **kw: Any) -> proto.Verdict:
    content = answer if isinstance(answer, str) else orjson.dumps(answer).decode()
    return proto.parse_response(completion(content, **kw), call_date=CALL_DATE, requested_model="asked-model")


def test_the_request_is_json_mode_not_streamed_and_holds_only_redacted_labelled_lines() -> None:
    lines = [("outbound", "This is an attempt to collect a debt."), ("inbound", f"my card is {CARD}"),
             ("inbound", "   "), ("agent", "Thanks.")]
    body = proto.request_body("m-1", lines, call_date=CALL_DATE, redactor=R)
    assert set(body) == {"model", "messages", "temperature", "max_tokens", "response_format", "stream"}
    assert body["response_format"] == {"type": "json_object"} and body["stream"] is False
    assert body["temperature"] == 0 and body["max_tokens"] == proto.MAX_TOKENS and body["model"] == "m-1"
    system, user = body["messages"]
    # JSON mode needs the word "json" in the messages (OpenAI and Groq refuse the request otherwise).
    assert "JSON" in system["content"] and "2026-11-30 (a Monday)" in system["content"]
    assert all(f'"{name}"' in system["content"] for name in proto.FIELDS)
    assert user["content"] == ("Agent: This is an attempt to collect a debt.\nConsumer: my card is [REDACTED:card]\n"
                               "Agent: Thanks.")
    assert "4111" not in orjson.dumps(body).decode()


def test_a_long_call_keeps_its_start_and_end_within_the_input_bound() -> None:
    lines = [("outbound", "This is an attempt to collect a debt.")]
    lines += [("inbound" if i % 2 else "outbound", f"line {i} " + "x" * 300) for i in range(200)]
    lines += [("inbound", "I will pay 50 dollars tomorrow.")]
    text, left_out = proto.transcript_text(lines, R)
    assert len(text) <= proto.MAX_INPUT_CHARS
    assert text.startswith("Agent: This is an attempt to collect a debt.")
    assert text.endswith("Consumer: I will pay 50 dollars tomorrow.")
    assert left_out > 0 and f"[... {left_out} lines left out ...]" in text
    assert len(text.splitlines()) == len(lines) - left_out + 1
    # A single long line is cut, not dropped.
    one, _ = proto.transcript_text([("inbound", "y" * 5000)], R)
    assert one == "Consumer: " + "y" * proto.MAX_LINE_CHARS


def test_a_good_answer_is_accepted_with_exact_decimals_and_the_model_the_server_names() -> None:
    v = parse(GOOD)
    assert v == proto.Verdict(GOOD["summary"], True, proto.Promise(Decimal("120.50"), date(2026, 12, 4)), False,
                              False, "llama-3.1-8b-instant")
    assert parse({**GOOD, "promise_to_pay": {"amount": 120.5, "date": None}}).promise_to_pay == proto.Promise(
        Decimal("120.50"), None)
    assert parse({**GOOD, "promise_to_pay": {"amount": 75, "date": "2026-11-29"}}).promise_to_pay == proto.Promise(
        Decimal("75.00"), date(2026, 11, 29))
    assert parse({**GOOD, "promise_to_pay": None}).promise_to_pay is None
    # No usable model name reported: the one asked for.
    assert parse(GOOD, model=None).model == "asked-model" and parse(GOOD, model="m" * 101).model == "asked-model"
    assert parse(GOOD, finish=None).summary == GOOD["summary"]  # servers that leave finish_reason out


def _with(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def _promise(amount: Any = "10.00", when: Any = "2026-12-01") -> dict[str, Any]:
    return _with(promise_to_pay={"amount": amount, "date": when})


INVALID = [
    ("[1, 2]", "not a JSON object"),
    (_with(summary=None), "summary is not a string"),
    (_with(summary="   "), "summary is empty"),
    (_with(summary="x" * (proto.MAX_SUMMARY_CHARS + 1)), f"longer than {proto.MAX_SUMMARY_CHARS}"),
    (_with(summary="a\x00b"), "control character"),
    (_with(disclosure_spoken="true"), "disclosure_spoken is not a boolean"),
    (_with(dispute=1), "dispute is not a boolean"),
    (_with(callback_requested=None), "callback_requested is not a boolean"),
    ({k: v for k, v in GOOD.items() if k != "dispute"}, "answer lacks dispute"),
    (_with(sentiment="angry"), "1 key(s) outside the schema"),
    (_with(promise_to_pay="yes"), "neither null nor an object"),
    (_with(promise_to_pay={"amount": "10.00"}), "promise_to_pay lacks date"),
    (_with(promise_to_pay={"amount": "10.00", "date": None, "currency": "USD"}), "outside the schema"),
    (_promise("$120"), "not a plain decimal string"),
    (_promise("1,000.00"), "not a plain decimal string"),
    (_promise("0"), "not within 0 < amount"),
    (_promise(-5), "not within 0 < amount"),
    (_promise(2_000_000), "not within 0 < amount"),
    (_promise(1.234), "more than 2 decimals"),
    (_promise(True), "amount is a boolean"),
    (_promise(["10"]), "neither null, a number nor a string"),
    (_promise(when="2026-13-01"), "not a calendar date"),
    (_promise(when="2026-02-30"), "not a calendar date"),
    (_promise(when="20261201"), "not an ISO date"),
    (_promise(when="Friday"), "not an ISO date"),
    (_promise(when=20261201), "not an ISO date"),
    (_promise(when="2026-11-28"), "not within the call date"),
    (_promise(when="2028-01-01"), "not within the call date"),
]


@pytest.mark.parametrize(("answer", "detail"), INVALID)
def test_an_answer_that_breaks_a_rule_is_rejected_as_invalid_naming_the_rule(answer: Any, detail: str) -> None:
    with pytest.raises(proto.Rejected) as caught:
        parse(answer)
    assert caught.value.reason == "invalid" and detail in caught.value.detail


@pytest.mark.parametrize("content", ['{"summary": "x"', "Sure! Here is the JSON: {}", "",
                                     '{"summary": "a", "summary": "b", "disclosure_spoken": true}',
                                     '{"summary": NaN}', '{"amount": Infinity}'])
def test_content_that_is_not_one_json_object_is_not_json(content: str) -> None:
    with pytest.raises(proto.Rejected) as caught:
        parse(content)
    assert caught.value.reason == "not_json"


@pytest.mark.parametrize(("body", "reason"), [
    (b"<html>502 Bad Gateway</html>", "malformed"),
    (b'{"error": {"message": "overloaded", "type": "server_error"}}', "malformed"),
    (b'{"object": "chat.completion", "choices": []}', "malformed"),
    (b'{"choices": {}}', "malformed"),
    (b'{"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "stop"}]}', "malformed"),
    (completion(orjson.dumps(GOOD).decode(), finish="content_filter"), "malformed"),
])
def test_a_body_that_is_not_a_usable_completion_is_malformed(body: bytes, reason: str) -> None:
    with pytest.raises(proto.Rejected) as caught:
        proto.parse_response(body, call_date=CALL_DATE, requested_model="m")
    assert caught.value.reason == reason


def test_an_answer_cut_by_max_tokens_is_truncated_even_if_its_json_parses() -> None:
    with pytest.raises(proto.Rejected) as caught:
        parse(GOOD, finish="length")
    assert caught.value.reason == "truncated"


def test_a_rejection_never_repeats_the_models_text() -> None:
    canary = "CANARY-4111-SECRET"
    for answer in (_with(**{canary: True}), _with(summary=canary * 200), _promise(canary), _promise(when=canary),
                   f'{{"summary": "{canary}"'):
        with pytest.raises(proto.Rejected) as caught:
            parse(answer)
        assert canary not in str(caught.value)


def test_the_stored_summary_is_redacted_again_and_the_score_has_the_offline_keys() -> None:
    lines = [("outbound", "This is an attempt to collect a debt."), ("inbound", "I will pay 120.50 on Friday.")]
    # The model repeats (or invents) a card number: it is masked before anything stores it.
    verdict = parse(_with(summary=f"Consumer paid with card {CARD} and promised 120.50 on Friday."))
    text, score, masked = proto.score(verdict, lines, R)
    assert text == "Consumer paid with card [REDACTED:card] and promised 120.50 on Friday." and masked == 1
    assert set(score) == set(summarize(lines).score)
    assert score == {"disclosure_spoken": True, "promise_to_pay": {"amount": "120.50", "date": "2026-12-04"},
                     "dispute": False, "callback_requested": False, "consumer_lines": 1, "agent_lines": 1}
    assert proto.score(parse(_with(promise_to_pay=None)), lines, R)[1]["promise_to_pay"] is None
