"""A call's summary and score, from its redacted transcript: the offline default (no model, no key).

Input: the call's lines, ``(track, text)`` in order, already redacted (``[REDACTED:<kind>]``); ``inbound``
is the consumer, ``outbound``/``agent`` our side.  Output: ``Summary(text, score)``.  No I/O.
The model-made summary (``pipelines.summary_engine``) falls back to this one.

The score, a table of rules (matched on lower-cased text, word-bounded)::

    field                 true when                                            from
    disclosure_spoken     the agent said the debt-collection disclosure        agent lines: DISCLOSURE
    promise_to_pay        the consumer promised a payment: its amount and      consumer lines: PROMISE cue,
                          date when said (first amount, first date word)        AMOUNT, DATE
    dispute               the consumer disputed the debt                       consumer lines: DISPUTE
    callback_requested    the consumer asked to be called back                 consumer lines: CALLBACK
    consumer_lines, agent_lines                                                counts

The summary: at most ``MAX_SENTENCES`` lines, the consumer's first line, then each line that made a
rule true (in call order), each cut at ``MAX_CHARS``; redaction markers are kept as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_SENTENCES = 4
MAX_CHARS = 200
CONSUMER = frozenset({"inbound"})

DISCLOSURE = re.compile(r"\b(attempt(ing)? to collect a debt|debt collector|information obtained will be used)\b")
PROMISE = re.compile(r"\b(i (will|can|could|'ll) (pay|make a payment|send)|i('ll| will) make a payment|"
                     r"promise to pay|i can pay|pay (it |you )?(on|by|next|this|tomorrow|today))\b")
AMOUNT = re.compile(r"(\$\s?\d[\d,]*(\.\d{2})?|\b\d[\d,]*(\.\d{2})? (dollars|euros|pounds)\b|"
                    r"\b(one|two|three|four|five|six|seven|eight|nine|ten|twenty|fifty|hundred)"
                    r"( (hundred|thousand))?( and \w+)? dollars\b)")
DATE = re.compile(r"\b(today|tomorrow|monday|tuesday|wednesday|thursday|friday|saturday|sunday|next week|"
                  r"end of (the )?month|\d{1,2}/\d{1,2}(/\d{2,4})?|(january|february|march|april|may|june|july|"
                  r"august|september|october|november|december) \d{1,2}(st|nd|rd|th)?)\b")
DISPUTE = re.compile(r"\b(dispute|not my debt|i don'?t owe|never (had|opened) (this|that|an) account|"
                     r"already paid|this is a mistake|wrong person)\b")
CALLBACK = re.compile(r"\b(call me back|call back (later|tomorrow)|call me (later|tomorrow|next week)|"
                      r"not a good time)\b")


@dataclass(frozen=True)
class Summary:
    text: str
    score: dict[str, Any] = field(default_factory=dict)
    provider: str = "rules"
    engine: str = "offline"  # "offline" (these rules) or "llm" (pipelines/summary_engine.py)
    model: str | None = None  # the model that answered, for "llm"
    fallback: str | None = None  # why the model's answer was not used, when it was asked and this is offline


def summarize(lines: Sequence[tuple[str, str]]) -> Summary:
    disclosure = False
    promise: dict[str, str | None] | None = None
    dispute = callback = False
    picked: list[str] = []
    consumer_lines = agent_lines = 0
    first_consumer: str | None = None
    for track, raw in lines:
        text = " ".join(raw.split())
        if not text:
            continue
        low = text.lower()
        hit = False
        if track in CONSUMER:
            consumer_lines += 1
            if first_consumer is None:
                first_consumer = text
            if promise is None and PROMISE.search(low):
                amount, date = AMOUNT.search(low), DATE.search(low)
                promise = {"amount": amount.group(0) if amount else None, "date": date.group(0) if date else None}
                hit = True
            if DISPUTE.search(low):
                dispute = hit = True
            if CALLBACK.search(low):
                callback = hit = True
        else:
            agent_lines += 1
            if not disclosure and DISCLOSURE.search(low):
                disclosure = hit = True
        if hit and text not in picked:
            picked.append(text)
    chosen = ([first_consumer] if first_consumer and first_consumer not in picked else []) + picked
    body = " ".join(f"“{t[:MAX_CHARS]}”" for t in chosen[:MAX_SENTENCES]) or "Nothing was said."
    return Summary(body, {"disclosure_spoken": disclosure, "promise_to_pay": promise, "dispute": dispute,
                          "callback_requested": callback, "consumer_lines": consumer_lines,
                          "agent_lines": agent_lines})
