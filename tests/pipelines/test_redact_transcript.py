"""A transcript payload's text and timed words are redacted together."""

from __future__ import annotations

from pipelines.redact_transcript import redact_payload
from pipelines.redaction import Redactor


def payload(text: str) -> dict:  # type: ignore[type-arg]
    words = [{"word": w, "start": i * 100, "end": i * 100 + 90, "confidence": 0.9} for i, w in enumerate(text.split())]
    return {"call_id": "c", "track": "inbound", "seq": 1, "text": text, "words": words}


def test_spoken_card_number_is_replaced_in_text_and_collapsed_in_words() -> None:
    p = payload("my card is four one one one one one one one one one one one one one one one thanks")
    out, found = redact_payload(Redactor(), p)
    assert found == 1
    assert out["text"] == "my card is [REDACTED:card] thanks"
    assert [w["word"] for w in out["words"]] == ["my", "card", "is", "[REDACTED:card]", "thanks"]
    red = out["words"][3]
    assert (red["start"], red["end"]) == (300, 1890)  # from the first digit word to the last
    assert "one" not in " ".join(w["word"] for w in out["words"])
    assert p["text"].startswith("my card is four")  # the input is not modified


def test_text_without_pii_comes_back_as_the_same_object() -> None:
    p = payload("i would like to make a payment of fifty dollars")
    out, found = redact_payload(Redactor(), p)
    assert out is p and found == 0


def test_two_kinds_in_one_utterance() -> None:
    p = payload("my ssn is 123-45-6789 and email john dot smith at gmail dot com")
    out, found = redact_payload(Redactor(), p)
    assert found == 2
    assert out["text"] == "my ssn is [REDACTED:ssn] and email [REDACTED:email]"
    assert [w["word"] for w in out["words"]] == ["my", "ssn", "is", "[REDACTED:ssn]", "and", "email",
                                                 "[REDACTED:email]"]
