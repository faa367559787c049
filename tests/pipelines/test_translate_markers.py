"""The marker rules every translator keeps (pipelines/translate/markers.py), without a translator."""

from __future__ import annotations

import pytest

from pipelines.translate.markers import join, kept, markers, split


def test_markers_are_found_in_order_exactly_as_written() -> None:
    text = "card [REDACTED:card], phone [REDACTED:phone] and [REDACTED:card] again"
    assert markers(text) == ["[REDACTED:card]", "[REDACTED:phone]", "[REDACTED:card]"]
    assert markers("no pii here, [REDACTED:address] is not a marker") == []


@pytest.mark.parametrize("translated, ok", [
    ("tarjeta [REDACTED:card], teléfono [REDACTED:phone]", True),
    ("tarjeta [REDACTED:tarjeta], teléfono [REDACTED:teléfono]", False),  # translated
    ("tarjeta, teléfono [REDACTED:phone]", False),  # dropped
    ("teléfono [REDACTED:phone], tarjeta [REDACTED:card]", False),  # reordered
    ("tarjeta [REDACTED:CARD], teléfono [REDACTED:phone]", False),  # not byte for byte
    ("tarjeta [REDACTED:card], teléfono [REDACTED:phone] [REDACTED:ssn]", False),  # invented
])
def test_kept_means_the_same_markers_in_the_same_order(translated: str, ok: bool) -> None:
    assert kept("card [REDACTED:card], phone [REDACTED:phone]", translated) is ok


@pytest.mark.parametrize("text", [
    "my number is [REDACTED:phone].",
    "[REDACTED:ssn] is my social",
    "[REDACTED:email]",
    "card [REDACTED:card], phone [REDACTED:phone] thanks",
    "two [REDACTED:card] [REDACTED:card] in a row",
    "no markers at all",
])
def test_split_then_join_gives_the_text_back(text: str) -> None:
    pieces, found = split(text)
    assert len(pieces) == len(found) + 1 and all("[REDACTED" not in p for p in pieces)
    assert join(pieces, found) == text


def test_join_spaces_translated_pieces_around_the_markers() -> None:
    assert join(["mi número es", ". Gracias"], ["[REDACTED:phone]"]) == "mi número es [REDACTED:phone]. Gracias"
    assert join(["", "es mi número"], ["[REDACTED:phone]"]) == "[REDACTED:phone] es mi número"
    with pytest.raises(ValueError):
        join(["a"], ["[REDACTED:phone]"])
