"""Truecasing lower-case recognised text before translation (pipelines/truecase.py)."""

from __future__ import annotations

import pytest

from pipelines.truecase import truecase


@pytest.mark.parametrize("text, expected", [
    ("i would like to pay", "I would like to pay"),
    ("yes i'm here and i'll pay, i've got it, i'd say so", "Yes I'm here and I'll pay, I've got it, I'd say so"),
    ("so i’m sure", "So I’m sure"),  # a curly apostrophe
    ("is it in italy or iowa", "Is it in italy or iowa"),  # "i" only as a word
    ("it's fine", "It's fine"),
    ("i", "I"),
    ("", ""),
    ("  well i know", "  Well I know"),
    ("42 dollars i said", "42 dollars I said"),
])
def test_english_lower_case_gets_its_first_capital_and_the_pronoun_i(text: str, expected: str) -> None:
    assert truecase(text, "en") == expected


def test_redaction_markers_are_never_touched_and_the_capital_skips_them() -> None:
    assert truecase("[REDACTED:phone] is my number i think", "en") == "[REDACTED:phone] Is my number I think"
    assert truecase("my card is [REDACTED:card] i said", "en") == "My card is [REDACTED:card] I said"


def test_text_formatted_by_its_provider_is_returned_as_is() -> None:
    for text in ("Hello, i'm Ana.", "my name is Ana", "I would like to pay"):
        assert truecase(text, "en") == text


def test_spanish_gets_the_first_capital_only() -> None:
    assert truecase("quiero pagar i más tarde", "es") == "Quiero pagar i más tarde"
    assert truecase("¿puedo pagar mañana?", "es") == "¿Puedo pagar mañana?"
