"""Spoken number words -> digits, keeping a map back to the original text.

Speech-to-text writes what a caller reads out in many ways: ``"one two three"``, ``"1 2 3"``,
``"oh five"``, ``"double five"``, ``"nineteen eighty five"``, ``"fourteenth"``.  ``normalize``
rewrites a transcript so that the detectors in ``pipelines.redaction`` only have to match digits:

- ``zero`` .. ``nine`` -> one digit; ``oh`` / ``o`` -> ``0`` only next to another number (``"oh I
  see"`` stays a word);
- ``ten`` .. ``nineteen`` -> two digits; ``twenty`` .. ``ninety`` with an optional unit
  (``"twenty-one"``, ``"forty five"``) -> two digits;
- ``X hundred [and] [Y]`` and ``X thousand [and] [Y]`` -> the value (``"eight hundred"`` -> ``800``,
  ``"two thousand and three"`` -> ``2003``); after ``hundred`` a single unit is only absorbed after
  ``and``, so ``"eight hundred five five five"`` stays ``800 5 5 5`` as in a phone number;
- ``double X`` / ``triple X`` -> ``XX`` / ``XXX``;
- ordinals (``first`` .. ``thirty first``) -> ``1st`` .. ``31st``;
- ``plus`` before a number -> ``+``.

Everything else is copied, with ASCII letters lower-cased (non-ASCII characters are copied as they
are, so ``str.lower`` length changes never shift offsets).  Each rewritten word group is one segment
of the map: a span in the normalised text maps back to whole words of the original, rounded
outwards.  Spans matching ``opaque`` (the redactor's own placeholders) become a single ``|`` so
that they neither join digit runs nor act as context.
"""

from __future__ import annotations

import re
import string
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
TEENS = {w: i + 10 for i, w in enumerate(
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: (i + 2) * 10 for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
ORDINALS = {w: i + 1 for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth"
    " fifteenth sixteenth seventeenth eighteenth nineteenth".split())}
ORDINALS |= {"twentieth": 20, "thirtieth": 30}
REPEATS = {"double": 2, "triple": 3}

# Token kinds.
_DIGITS, _UNIT, _OH, _TEEN, _TENS, _HUNDRED, _THOUSAND, _AND, _REPEAT, _PLUS, _ORD, _OTHER = range(12)
_NUMERIC = frozenset({_DIGITS, _UNIT, _TEEN, _TENS, _REPEAT})

_WORD_KIND: dict[str, tuple[int, int]] = {
    **{w: (_UNIT, v) for w, v in UNITS.items()},
    **{w: (_TEEN, v) for w, v in TEENS.items()},
    **{w: (_TENS, v) for w, v in TENS.items()},
    **{w: (_ORD, v) for w, v in ORDINALS.items()},
    **{w: (_REPEAT, v) for w, v in REPEATS.items()},
    "oh": (_OH, 0), "o": (_OH, 0), "hundred": (_HUNDRED, 100), "thousand": (_THOUSAND, 1000),
    "and": (_AND, 0), "plus": (_PLUS, 0),
}
_QUICK = re.compile(r"\d|" + "|".join(sorted(_WORD_KIND, key=len, reverse=True)), re.IGNORECASE)
_TOKEN = re.compile(r"[a-z]+|\d+")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ADJACENT_GAP = re.compile(r"[ \t]*[,.\-]?[ \t]*")  # between numbers read as one sequence
_WORD_GAP = re.compile(r"[ \t]+|[ \t]*-[ \t]*")  # inside one number ("twenty-one", "two thousand")


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: int
    value: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Normalized:
    """A normalised transcript; ``to_original`` maps a span of ``text`` back to the original."""

    text: str
    _seg_starts: tuple[int, ...]  # normalised start of each rewritten segment
    _segs: tuple[tuple[int, int, int, int], ...]  # (norm_start, norm_end, orig_start, orig_end)

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """The original span covering normalised ``[start, end)`` (rewritten words are kept whole)."""
        segs = self._segs
        k = bisect_right(self._seg_starts, start) - 1
        if k >= 0 and start < segs[k][1]:
            o_start = segs[k][2]
        else:
            o_start = start if k < 0 else start - segs[k][1] + segs[k][3]
        k = bisect_left(self._seg_starts, end) - 1
        if k >= 0 and end <= segs[k][1]:
            o_end = segs[k][3]
        else:
            o_end = end if k < 0 else end - segs[k][1] + segs[k][3]
        return o_start, o_end


def normalize(text: str, opaque: re.Pattern[str] | None = None) -> Normalized:
    """Rewrite number words in ``text`` as digits (see the module docstring)."""
    low = text.translate(_ASCII_LOWER)
    masks = [(m.start(), m.end()) for m in opaque.finditer(low)] if opaque is not None and "[" in low else []
    if not masks and not _QUICK.search(low):
        return Normalized(low, (), ())
    toks: list[_Tok] = []
    mi = 0
    for m in _TOKEN.finditer(low):
        while mi < len(masks) and masks[mi][1] <= m.start():
            mi += 1
        if mi < len(masks) and masks[mi][0] <= m.start():
            continue
        word = m.group()
        if word[0].isdigit():
            toks.append(_Tok(_DIGITS, len(word), m.start(), m.end()))
        else:
            kind, value = _WORD_KIND.get(word, (_OTHER, 0))
            toks.append(_Tok(kind, value, m.start(), m.end()))
    _resolve_ohs(low, toks)
    rewrites = sorted(_rewrites(low, toks) + [(s, e, "|") for s, e in masks])

    pieces: list[str] = []
    segs: list[tuple[int, int, int, int]] = []
    pos = npos = 0
    for o_start, o_end, new in rewrites:
        pieces.append(low[pos:o_start])
        npos += o_start - pos
        pieces.append(new)
        segs.append((npos, npos + len(new), o_start, o_end))
        npos += len(new)
        pos = o_end
    pieces.append(low[pos:])
    return Normalized("".join(pieces), tuple(s[0] for s in segs), tuple(segs))


def _joined(low: str, a: _Tok, b: _Tok, gap: re.Pattern[str]) -> bool:
    return gap.fullmatch(low, a.end, b.start) is not None


def _resolve_ohs(low: str, toks: list[_Tok]) -> None:
    """Turn runs of ``oh`` into zeros when they touch another number."""
    i, n = 0, len(toks)
    while i < n:
        if toks[i].kind != _OH:
            i += 1
            continue
        j = i
        while j + 1 < n and toks[j + 1].kind == _OH and _joined(low, toks[j], toks[j + 1], _ADJACENT_GAP):
            j += 1
        numeric_before = i > 0 and toks[i - 1].kind in _NUMERIC and _joined(low, toks[i - 1], toks[i], _ADJACENT_GAP)
        numeric_after = j + 1 < n and toks[j + 1].kind in _NUMERIC and _joined(
            low, toks[j], toks[j + 1], _ADJACENT_GAP)
        for k in range(i, j + 1):
            t = toks[k]
            toks[k] = _Tok(_UNIT if numeric_before or numeric_after else _OTHER, 0, t.start, t.end)
        i = j + 1


def _ordinal(value: int) -> str:
    suffix = "th" if 10 <= value % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")
    return f"{value}{suffix}"


def _rewrites(low: str, toks: list[_Tok]) -> list[tuple[int, int, str]]:
    """(orig_start, orig_end, replacement) for every group of number words."""
    out: list[tuple[int, int, str]] = []
    n = len(toks)

    def next_is(i: int, kinds: tuple[int, ...]) -> bool:
        return i + 1 < n and toks[i + 1].kind in kinds and _joined(low, toks[i], toks[i + 1], _WORD_GAP)

    def small(i: int) -> tuple[int, int]:
        """unit | teen | tens [unit] starting at ``i`` -> (value, index after)."""
        t = toks[i]
        if t.kind == _TENS and next_is(i, (_UNIT,)) and toks[i + 1].value > 0:
            return t.value + toks[i + 1].value, i + 2
        return t.value, i + 1

    def tail(value: int, i: int, unit_needs_and: bool) -> tuple[int, int]:
        """The optional ``[and] Y`` after hundred/thousand; ``i`` is the multiplier's index."""
        j = i
        has_and = next_is(j, (_AND,))
        if has_and:
            j += 1
        if next_is(j, (_TEEN, _TENS)):
            add, after = small(j + 1)
            return value + add, after - 1
        if next_is(j, (_UNIT,)) and toks[j + 1].value > 0 and (has_and or not unit_needs_and):
            return value + toks[j + 1].value, j + 1
        return value, i

    i = 0
    while i < n:
        t = toks[i]
        if t.kind == _REPEAT and next_is(i, (_UNIT, _DIGITS)) and (
                toks[i + 1].kind == _UNIT or toks[i + 1].end - toks[i + 1].start == 1):
            nxt = toks[i + 1]
            digit = str(nxt.value) if nxt.kind == _UNIT else low[nxt.start]
            out.append((t.start, nxt.end, digit * t.value))
            i += 2
        elif t.kind == _PLUS and i + 1 < n and toks[i + 1].kind in _NUMERIC and _joined(
                low, t, toks[i + 1], _ADJACENT_GAP):
            out.append((t.start, t.end, "+"))
            i += 1
        elif t.kind == _ORD:
            out.append((t.start, t.end, _ordinal(t.value)))
            i += 1
        elif t.kind == _TENS and next_is(i, (_ORD,)) and toks[i + 1].value < 10:
            out.append((t.start, toks[i + 1].end, _ordinal(t.value + toks[i + 1].value)))
            i += 2
        elif t.kind in (_UNIT, _TEEN, _TENS):
            value, j = small(i)
            last = j - 1
            if 1 <= value <= 19 and next_is(last, (_HUNDRED,)):
                value, last = tail(value * 100, last + 1, unit_needs_and=True)
            if 1 <= value <= 999 and next_is(last, (_THOUSAND,)):
                value, last = tail(value * 1000, last + 1, unit_needs_and=False)
            out.append((t.start, toks[last].end, str(value)))
            i = last + 1
        else:
            i += 1
    return out
