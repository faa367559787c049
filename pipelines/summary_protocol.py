"""A call's summary and score by an OpenAI-compatible chat model, as pure protocol logic without I/O.

Lines in, request body out; response bytes in, a checked verdict (or ``Rejected`` and why) out.  The
HTTP part (timeouts, retries, the offline fallback) is ``pipelines.summary_engine``; the retry rules
and error-body parsing are the translator's (``pipelines.translate.openai_protocol``).

What is sent.  ``request_body`` takes the call's lines ``(track, text)`` and *runs the redactor over
every line itself*, so no caller can build a request from unredacted text, whatever the stored rows
hold (they are redacted when written; this is the second, independent pass).  The lines become
``Consumer: ...`` / ``Agent: ...`` text, each cut at ``MAX_LINE_CHARS``; past ``MAX_INPUT_CHARS`` in
all, the middle of the call is left out (``[... N lines left out ...]``): the disclosure is said at
the start and a promise to pay near the end.  The request::

    POST {base_url}/chat/completions
    {"model", "messages": [system, user], "temperature": 0, "max_tokens": MAX_TOKENS,
     "response_format": {"type": "json_object"}, "stream": false}

``json_object`` rather than ``json_schema``: every OpenAI-compatible server (Groq's small models
included) offers it; the schema is spelled out in the system prompt, and the answer is held to it
here, strictly, because JSON mode promises valid JSON, not the right JSON.

What is accepted.  A ``chat.completion`` whose first choice has ``finish_reason`` ``stop`` and string
``content`` that parses (no NaN/Infinity, no repeated key, decimals kept exact) to exactly::

    field                type                       rule
    summary              string                     1..MAX_SUMMARY_CHARS after trimming; no control
                                                    characters but newline
    disclosure_spoken    boolean                    true or false, never "true" or 1
    promise_to_pay       null or object             exactly {amount, date}
      amount             null, number or string     a decimal, 0 < amount <= MAX_AMOUNT, at most
                                                    2 decimals ("120.50", 120.5; not "$120")
      date               null or string             YYYY-MM-DD, within call date - 1 day ..
                                                    call date + MAX_PROMISE_DAYS
    dispute              boolean
    callback_requested   boolean

Anything else raises ``Rejected(reason, detail)``; ``detail`` names the field and the rule, never the
model's text (it may quote the call).  The reasons, each a fallback to the offline summary::

    reason       when
    malformed    the body is not a chat.completion (not JSON, no choices, no string content), or
                 an ``error`` object came with status 200
    truncated    finish_reason "length": the answer hit MAX_TOKENS, its JSON is cut
    not_json     content is not one JSON object
    invalid      the object breaks the table above

(``summary_engine`` adds ``timeout``, ``unavailable`` and ``refused`` for the transport.)

The model's output is untrusted too: ``score`` runs the redactor over the accepted summary text before
it is stored (a model may invent or repeat a number), and counts what it masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from pipelines.redaction import Redactor

MAX_LINE_CHARS: Final = 1_000  # one line as sent
MAX_INPUT_CHARS: Final = 12_000  # the transcript as sent (~3k tokens: within a free-tier per-minute quota)
PROMPT_SUMMARY_CHARS: Final = 600  # what the prompt asks for ...
MAX_SUMMARY_CHARS: Final = 1_200  # ... and what is accepted (a model overshoots a little)
MAX_TOKENS: Final = 600  # answer budget: the JSON object with a 600-character summary fits
MAX_AMOUNT: Final = Decimal("1000000")
MAX_PROMISE_DAYS: Final = 366
MAX_MODEL_CHARS: Final = 100  # the model name a server reports, as stored
SPEAKERS: Final = {"inbound": "Consumer"}  # every other track is our side
AGENT: Final = "Agent"

FIELDS: Final = frozenset({"summary", "disclosure_spoken", "promise_to_pay", "dispute", "callback_requested"})
PROMISE_FIELDS: Final = frozenset({"amount", "date"})
_AMOUNT_TEXT = re.compile(r"\d{1,7}(\.\d{1,2})?")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


class Rejected(Exception):
    """The answer cannot be used; ``reason`` is one of the table's codes, ``detail`` names the rule."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Promise:
    amount: Decimal | None
    date: date | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """An answer that passed every rule; ``model`` is the one the server says answered."""

    summary: str
    disclosure_spoken: bool
    promise_to_pay: Promise | None
    dispute: bool
    callback_requested: bool
    model: str


# -- the request --------------------------------------------------------------------------------------


def system_prompt(call_date: date) -> str:
    return (
        "You review debt-collection phone calls for compliance. You get one call's transcript, "
        "'Consumer:' lines from the person called, 'Agent:' lines from our agent. "
        f"The call took place on {call_date.isoformat()} (a {call_date:%A}). "
        "Answer with one JSON object and nothing else, with exactly these keys: "
        f'"summary": what happened on the call, in at most {PROMPT_SUMMARY_CHARS} characters of plain prose; '
        '"disclosure_spoken": true if the agent said the call is an attempt to collect a debt, else false; '
        '"promise_to_pay": null, or {"amount": the promised amount as a decimal string such as "120.50", '
        'or null if none was said, "date": the promised payment date as YYYY-MM-DD, or null if none was said} '
        "when the consumer promised to pay; "
        '"dispute": true if the consumer disputed the debt, else false; '
        '"callback_requested": true if the consumer asked to be called back, else false. '
        "Use only what the transcript says. Never guess a number. Text of the form [REDACTED:...] hides "
        "personal data: copy such markers as written, never try to restore what they hide."
    )


def transcript_text(lines: Sequence[tuple[str, str]], redactor: Redactor) -> tuple[str, int]:
    """The lines as sent (each redacted, speaker-labelled, cut) and how many were left out."""
    rendered = []
    for track, raw in lines:
        text = " ".join(redactor.redact(raw).text.split())
        if text:
            rendered.append(f"{SPEAKERS.get(track, AGENT)}: {text[:MAX_LINE_CHARS]}")
    total = sum(len(r) + 1 for r in rendered)
    if total <= MAX_INPUT_CHARS:
        return "\n".join(rendered), 0
    # Keep whole lines from both ends, alternately, until the budget is spent.
    budget = MAX_INPUT_CHARS - 40  # the "left out" line
    head: list[str] = []
    tail: list[str] = []
    i, j = 0, len(rendered) - 1
    while i <= j:
        pick = rendered[i] if len(head) <= len(tail) else rendered[j]
        if len(pick) + 1 > budget:
            break
        budget -= len(pick) + 1
        if len(head) <= len(tail):
            head.append(pick)
            i += 1
        else:
            tail.append(pick)
            j -= 1
    left_out = len(rendered) - len(head) - len(tail)
    return "\n".join([*head, f"[... {left_out} lines left out ...]", *reversed(tail)]), left_out


def request_body(model: str, lines: Sequence[tuple[str, str]], *, call_date: date,
                 redactor: Redactor) -> dict[str, Any]:
    text, _ = transcript_text(lines, redactor)
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": system_prompt(call_date)},
            {"role": "user", "content": text},
        ],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "response_format": {"type": "json_object"},
        "stream": False,
    }


# -- the answer ---------------------------------------------------------------------------------------


def parse_response(body: bytes, *, call_date: date, requested_model: str) -> Verdict:
    """A 200 body -> its checked verdict, or ``Rejected``."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        raise Rejected("malformed", "the body is not JSON") from None
    if isinstance(obj, dict) and "error" in obj:
        raise Rejected("malformed", "an error object with status 200")
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Rejected("malformed", "no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise Rejected("malformed", "choices[0].message.content is not a string")
    finish = choices[0].get("finish_reason")
    if finish == "length":
        raise Rejected("truncated", f"the answer reached max_tokens ({MAX_TOKENS})")
    if finish not in ("stop", None):  # None: a few servers leave it out of a finished answer
        raise Rejected("malformed", f"finish_reason {str(finish)[:20]!r}")
    reported = obj.get("model")
    model = reported if isinstance(reported, str) and 0 < len(reported) <= MAX_MODEL_CHARS else requested_model
    return validate(_content_json(content), call_date=call_date, model=model)


def _content_json(content: str) -> Any:
    def no_constant(name: str) -> Any:
        raise Rejected("not_json", f"{name} is not JSON")

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise Rejected("not_json", "a key appears twice")
        return out

    try:
        return json.loads(content, parse_float=Decimal, parse_constant=no_constant, object_pairs_hook=no_repeats)
    except (ValueError, RecursionError):
        raise Rejected("not_json", "content is not a JSON value") from None


def validate(obj: Any, *, call_date: date, model: str) -> Verdict:
    """The parsed answer held to the module's table."""
    if not isinstance(obj, dict):
        raise Rejected("invalid", "the answer is not a JSON object")
    _exact_keys(obj, FIELDS, "answer")
    summary = obj["summary"]
    if not isinstance(summary, str):
        raise Rejected("invalid", "summary is not a string")
    summary = summary.strip()
    if not 0 < len(summary) <= MAX_SUMMARY_CHARS:
        raise Rejected("invalid", f"summary is empty or longer than {MAX_SUMMARY_CHARS} characters")
    if _CONTROL.search(summary):
        raise Rejected("invalid", "summary holds a control character")
    flags = {name: obj[name] for name in ("disclosure_spoken", "dispute", "callback_requested")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise Rejected("invalid", f"{name} is not a boolean")
    promise = obj["promise_to_pay"]
    if promise is not None:
        if not isinstance(promise, dict):
            raise Rejected("invalid", "promise_to_pay is neither null nor an object")
        _exact_keys(promise, PROMISE_FIELDS, "promise_to_pay")
        promise = Promise(_amount(promise["amount"]), _date(promise["date"], call_date))
    return Verdict(summary, flags["disclosure_spoken"], promise, flags["dispute"], flags["callback_requested"], model)


def _exact_keys(obj: dict[str, Any], wanted: frozenset[str], where: str) -> None:
    missing, extra = sorted(wanted - obj.keys()), sorted(obj.keys() - wanted)
    if missing:
        raise Rejected("invalid", f"{where} lacks {', '.join(missing)}")
    if extra:
        # Named by count, not by name: an invented key may itself be text from the call.
        raise Rejected("invalid", f"{where} has {len(extra)} key(s) outside the schema")


def _amount(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool):  # a bool is an int to Python, never an amount
        raise Rejected("invalid", "promise_to_pay.amount is a boolean")
    if isinstance(value, str):
        if not _AMOUNT_TEXT.fullmatch(value):
            raise Rejected("invalid", "promise_to_pay.amount is not a plain decimal string")
        amount = Decimal(value)
    elif isinstance(value, int | Decimal):
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise Rejected("invalid", "promise_to_pay.amount is not a decimal") from None
    else:
        raise Rejected("invalid", "promise_to_pay.amount is neither null, a number nor a string")
    if not amount.is_finite() or not 0 < amount <= MAX_AMOUNT:
        raise Rejected("invalid", f"promise_to_pay.amount is not within 0 < amount <= {MAX_AMOUNT}")
    if amount != amount.quantize(Decimal("0.01")):
        raise Rejected("invalid", "promise_to_pay.amount has more than 2 decimals")
    return amount.quantize(Decimal("0.01"))


def _date(value: Any, call_date: date) -> date | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
        raise Rejected("invalid", "promise_to_pay.date is not an ISO date (YYYY-MM-DD)")
    try:
        when = date.fromisoformat(value)
    except ValueError:
        raise Rejected("invalid", "promise_to_pay.date is not a calendar date") from None
    if not call_date - timedelta(days=1) <= when <= call_date + timedelta(days=MAX_PROMISE_DAYS):
        raise Rejected("invalid", f"promise_to_pay.date is not within the call date - 1 .. + {MAX_PROMISE_DAYS} days")
    return when


# -- what is stored -----------------------------------------------------------------------------------


def score(verdict: Verdict, lines: Sequence[tuple[str, str]], redactor: Redactor) -> tuple[str, dict[str, Any], int]:
    """(summary text as stored, score, markers the redactor put in the summary).

    The score has the offline summary's keys (``pipelines.summary``), so readers need not know which
    engine wrote it; ``promise_to_pay`` holds the amount as a decimal string and the date as ISO.
    """
    redacted = redactor.redact(verdict.summary)
    promise = verdict.promise_to_pay
    consumer = sum(1 for track, text in lines if text.strip() and track in SPEAKERS)
    agent = sum(1 for track, text in lines if text.strip() and track not in SPEAKERS)
    return redacted.text, {
        "disclosure_spoken": verdict.disclosure_spoken,
        "promise_to_pay": None if promise is None else {
            "amount": None if promise.amount is None else str(promise.amount),
            "date": None if promise.date is None else promise.date.isoformat()},
        "dispute": verdict.dispute,
        "callback_requested": verdict.callback_requested,
        "consumer_lines": consumer,
        "agent_lines": agent,
    }, len(redacted.findings)
