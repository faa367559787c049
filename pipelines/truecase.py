"""Truecasing recognised text before it is translated, without I/O.

The offline recogniser (pocketsphinx) writes everything in lower case.  Translators read case: Apertium
takes "i" for an unknown word and a sentence without a capital for a fragment ("i would like" ->
"*i Gustaría").  So a final is truecased on its way to a translator (``api.speech.CallEvents``), never
on its way to SSE or storage, which keep what the recogniser said.

Rules, applied only to text with no upper-case letter outside its redaction markers (text that is
lower case *as recognised*; a cloud provider's formatted text, "Hello, I'm Ana", is returned as is):

1. the utterance's first word gets a capital when it starts with a letter (blanks, punctuation such
   as "¿" and markers before it are skipped; "42 dollars" stays as it is);
2. in English, the pronoun "i" and its contractions "i'm", "i'll", "i've", "i'd" (straight or curly
   apostrophe), as whole words, become "I", "I'm", ...

Redaction markers (``[REDACTED:phone]``) are never changed, and nothing else is: the result has the
same length as the input and differs only in the case of those letters.
"""

from __future__ import annotations

import re

from pipelines.redaction import PLACEHOLDER

_PRONOUN = re.compile(r"(?<![\w'’])i(?=(?:['’](?:m|ll|ve|d))?(?![\w'’]))")


def truecase(text: str, language: str) -> str:
    """``text`` with the capitals a lower-case recogniser leaves out (see the module docstring)."""
    plain = PLACEHOLDER.sub(lambda m: " " * len(m.group()), text)  # markers out of the way, lengths kept
    if plain != plain.lower():
        return text  # formatted by its provider: as it came
    chars = list(text)
    first = next((i for i, ch in enumerate(plain) if ch.isalnum()), None)
    if first is not None and plain[first].isalpha():
        chars[first] = chars[first].upper()
    if language == "en":
        for m in _PRONOUN.finditer(plain):
            chars[m.start()] = "I"
    return "".join(chars)
