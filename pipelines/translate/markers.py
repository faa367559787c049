"""Redaction markers through translation, without I/O: what goes in must come out, byte for byte.

Finals are redacted before they are translated (``pipelines.redaction``): PII is replaced by markers
``[REDACTED:ssn|card|dob|email|phone|number]``.  A translator must not touch them: Apertium translates the
inside of the brackets (``[REDACTED:teléfono]``) and a language model may drop, translate or reorder
them.  The rule every translator keeps (``Translator.translate``'s contract, ``base.py``):

    markers(translated) == markers(original)      exactly: the same strings, the same order

How each provider keeps it:

* **Apertium** (``apertium.py``) sends each marker as a *superblank*, the stream format's way of
  saying "not text, carry it through" (``apertium_format.deformat(..., keep=PLACEHOLDER)``); the
  answer is still checked.
* **OpenAI-compatible** (``openai_compat.py``) tells the model to copy them (``openai_protocol``'s
  system prompt) and checks the answer.  An answer that fails the check is not published: the text
  is cut at its markers (``split``), each piece between them translated on its own, and the
  translations joined with the original markers (``join``).  Each such fallback is counted.

``split(text)`` -> ``(pieces, found)`` with ``len(pieces) == len(found) + 1``; ``join(pieces, found)``
gives the text back up to the blanks next to markers: one space between a marker and a word, none
between a marker and the punctuation after it.
"""

from __future__ import annotations

from pipelines.redaction import PLACEHOLDER

__all__ = ["PLACEHOLDER", "join", "kept", "markers", "split"]


def markers(text: str) -> list[str]:
    """The markers in ``text``, in order, exactly as written."""
    return PLACEHOLDER.findall(text)


def kept(original: str, translated: str) -> bool:
    """Whether ``translated`` holds exactly the markers of ``original``, in the same order."""
    return markers(original) == markers(translated)


def split(text: str) -> tuple[list[str], list[str]]:
    """The text between markers (stripped of the spaces next to them) and the markers themselves."""
    pieces: list[str] = []
    found: list[str] = []
    pos = 0
    for m in PLACEHOLDER.finditer(text):
        pieces.append(text[pos : m.start()].strip())
        found.append(m.group())
        pos = m.end()
    pieces.append(text[pos:].strip())
    return pieces, found


def join(pieces: list[str], found: list[str]) -> str:
    """Pieces (translated) and markers back into one text: ``pieces[0] found[0] pieces[1] ...``."""
    if len(pieces) != len(found) + 1:
        raise ValueError(f"{len(pieces)} pieces cannot surround {len(found)} markers")
    out = pieces[0]
    for marker, piece in zip(found, pieces[1:], strict=True):
        out = f"{out} {marker}" if out else marker
        if piece:
            out += piece if piece[0] in ".,;:!?)" else " " + piece
    return out.strip()
