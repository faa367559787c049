"""Typed call events: wire names and payloads, delivery class, and a transcript's text and timed words
redacted together."""

from __future__ import annotations

import orjson

from pipelines.events import CallStarted, SttFailed, SttFailover, TranscriptEvent
from pipelines.redaction import Redactor
from pipelines.stt.base import Word


def transcript(text: str, final: bool = True) -> TranscriptEvent:
    words = tuple(Word(w, i * 100, i * 100 + 90, 0.9) for i, w in enumerate(text.split()))
    return TranscriptEvent("c", "s", "inbound", text, words, 0.8, 1, 0, len(words) * 100, final)


def test_spoken_card_number_is_replaced_in_text_and_collapsed_in_words() -> None:
    ev = transcript("my card is four one one one one one one one one one one one one one one one thanks")
    out, found = ev.redacted(Redactor())
    assert found == 1
    assert out.text == "my card is [REDACTED:card] thanks"
    assert [w.text for w in out.words] == ["my", "card", "is", "[REDACTED:card]", "thanks"]
    red = out.words[3]
    assert (red.start_ms, red.end_ms) == (300, 1890)  # from the first digit word to the last
    assert "one" not in orjson.dumps(out.payload()).decode()
    assert ev.text.startswith("my card is four")  # the input is not modified


def test_text_without_pii_comes_back_as_the_same_object() -> None:
    ev = transcript("i would like to make a payment of fifty dollars")
    out, found = ev.redacted(Redactor())
    assert out is ev and found == 0


def test_two_kinds_in_one_utterance() -> None:
    out, found = transcript("my ssn is 123-45-6789 and email john dot smith at gmail dot com").redacted(Redactor())
    assert found == 2
    assert out.text == "my ssn is [REDACTED:ssn] and email [REDACTED:email]"
    assert [w.text for w in out.words] == ["my", "ssn", "is", "[REDACTED:ssn]", "and", "email", "[REDACTED:email]"]


def test_partials_are_droppable_per_track_and_finals_are_owed() -> None:
    partial, final = transcript("hello", final=False), transcript("hello")
    assert (partial.name, partial.droppable, partial.key) == ("transcript.partial", True, "partial:inbound")
    assert (final.name, final.droppable) == ("transcript.final", False)
    assert final.payload() == {"call_id": "c", "stream_id": "s", "track": "inbound", "text": "hello",
                               "words": [{"word": "hello", "start": 0, "end": 90, "confidence": 0.9}],
                               "confidence": 0.8, "seq": 1, "start": 0, "end": 100}


def test_wire_names_and_renamed_fields() -> None:
    started = CallStarted("c", "s", "sess", "PCMU", 8000, "+1555", "+1666", "en", None, "null")
    assert started.name == "call.started" and started.payload()["from"] == "+1555" and "from_" not in started.payload()
    assert SttFailover("c", "s", "inbound", "a", "b", "down").payload()["from"] == "a"
    assert "seq" not in SttFailed("c", "s", "inbound", "gone").payload()  # the session, not one utterance
    assert SttFailed("c", "s", "inbound", "queue full", 3).payload()["seq"] == 3
