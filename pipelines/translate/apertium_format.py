"""Plain text to and from the Apertium stream format, without I/O.

This is what ``apertium-destxt`` / ``apertium-retxt`` do around the translation pipeline; we do it
here because those two programs (apertium 3.8.3, Debian 12) drop the NUL byte that null-flush mode
relies on and buffer their output, so a long-lived ``apertium -z`` never answers before EOF (see
``apertium.py``).

``deformat(text)``:

* escapes the characters the stream format reserves (``\\ [ ] ^ $ / @ < > { }``): an unescaped
  ``@`` or ``$`` makes ``lt-proc`` report "Malformed input stream" and every later answer of that
  process comes back empty, so this escaping is what keeps a long-lived process healthy;
* turns each run of whitespace other than plain spaces (newlines, tabs) into a superblank
  ``[...]``, which the pipeline carries through untranslated; a blank line also ends a sentence
  (``.[]``), as destxt does;
* makes each span that ``keep`` matches (redaction markers, ``markers.PLACEHOLDER``) a superblank
  of its own, so it comes back byte for byte where it was, untranslated;
* ends the text with ``.[]`` (a sentence end the tagger and transfer need; removed again by
  ``reformat``); NUL bytes, which would split one request into two, become spaces.

``reformat(stream)``: unescapes, opens superblanks, drops the ``.[]`` end marks and the unknown-word
marks ``*word`` (not in the source dictionary), ``@word`` (no bilingual entry) and ``#word`` (cannot
be generated), keeping the word; collapses the double spaces left by dropped words (English "I"
becomes nothing in Spanish) and strips the ends.  Known limits: a literal ``*``/``#``/``@`` directly
before a word in the source is read as a mark and dropped; a literal ``~`` is eaten by the
post-generator.
"""

from __future__ import annotations

import re

RESERVED = frozenset("\\[]^$/@<>{}")
UNKNOWN_MARKS = frozenset("*#@")
END_MARK = ".[]"

_WS = re.compile(r"\s+")
_SPACES = re.compile(r" {2,}")
_SPACES_AROUND_NEWLINE = re.compile(r" *\n *")


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in RESERVED else ch for ch in text)


def deformat(text: str, keep: re.Pattern[str] | None = None) -> str:
    """Plain text -> one Apertium stream request (without the trailing NUL); spans matching ``keep``
    travel as superblanks (untranslated)."""
    text = text.replace("\0", " ").strip()
    out: list[str] = []
    pos = 0
    for m in keep.finditer(text) if keep is not None else ():
        _text(text[pos : m.start()], out)
        out.append("[" + _escape(m.group()) + "]")
        pos = m.end()
    _text(text[pos:], out)
    out.append(END_MARK)
    return "".join(out)


def _text(text: str, out: list[str]) -> None:
    pos = 0
    for m in _WS.finditer(text):
        out.append(_escape(text[pos : m.start()]))
        run = m.group()
        if run.strip(" "):
            if run.count("\n") >= 2:
                out.append(END_MARK)
            out.append("[" + _escape(run) + "]")
        else:
            out.append(run)
        pos = m.end()
    out.append(_escape(text[pos:]))


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def reformat(stream: str) -> str:
    """One Apertium stream answer (NUL removed) -> plain text."""
    out: list[str] = []
    i, n = 0, len(stream)
    while i < n:
        ch = stream[i]
        if ch == "\\" and i + 1 < n:
            out.append(stream[i + 1])
            i += 2
        elif ch == "[":
            i += 1
            blank: list[str] = []
            while i < n and stream[i] != "]":
                if stream[i] == "\\" and i + 1 < n:
                    i += 1
                blank.append(stream[i])
                i += 1
            i += 1  # the closing bracket
            if not blank and out and out[-1] == ".":
                out.pop()  # ".[]": the sentence end deformat added
            out.extend(blank)
        elif ch in UNKNOWN_MARKS and i + 1 < n and _is_word_char(stream[i + 1]):
            i += 1
        else:
            out.append(ch)
            i += 1
    text = _SPACES.sub(" ", "".join(out))
    return _SPACES_AROUND_NEWLINE.sub("\n", text).strip()
