"""PII redaction of transcript text, run before a transcript reaches a translator, a log or analytics.

Pure Python, no I/O.  ``Redactor.redact(text)`` returns the text with every finding replaced by
``[REDACTED:<kind>]`` and the findings as spans of the *original* text.

How it works.  The transcript is first normalised (``pipelines.spoken_numbers``): number words
become digits (``"oh five"`` -> ``0 5``, ``"nineteen eighty five"`` -> ``19 85``) with a map back to
the original words, so every detector below matches digits only and replacement happens in the
original text.  Then:

- **Digit runs**: digits separated by at most one space, dash, dot, ``", "`` or parenthesis
  (``"(555) 123-4567"``, ``"4111 1111 1111 1111"``, ``"1 2 3 4 5"``).  A run that is money
  (``$`` before, ``dollars`` / ``cents`` / ``percent`` after) is skipped.  The whole run is
  classified; only when it is nothing are its group-aligned sub-runs tried (so ``"... 555 123 4567.
  2 payments"`` still finds the phone):

  - **card**: 13-19 digits, Luhn-valid, first digit 2-6 (Visa, Mastercard, Amex, Discover, JCB,
    Diners, UnionPay).  Context is not needed and does not veto: a Luhn-valid number read out as an
    "account number" is redacted.
  - **ssn**: 9 digits, unless the context names another identifier (order, account, reference,
    zip ...).  With SSN context (``ssn``, ``social``, ``s s n``, ``tax id``) any 9 digits are
    redacted, even ones the SSA never issues (a misheard digit is still someone's SSN).  Without
    it, the digits must pass the SSA rules (area not 000, 666 or 9xx; group not 00; serial not
    0000) and be grouped compatibly with AAA-GG-SSSS (``123-45-6789``, ``123 45 6789``, digits read
    one by one); an unbroken ``123456789`` needs the context.
  - **dob**: 6 or 8 digits that parse as MMDDYY(YY) / YYYYMMDD with birth context (``"oh three
    fourteen eighty five"``).
  - **phone**: ``+`` then 8-15 digits; 10 digits not starting with 0 or 1; 11 digits starting
    with 1 (NANP) or 0 (UK national); ``00``/``011`` exit codes; 7 digits with phone context
    (``call``, ``phone``, ``cell`` ...).  Another identifier's context (order, account ...) vetoes.
    ``area code 555`` followed within a few words by a 7-digit number is one phone.

- **dob** (dates): ``03/14/1985``, ``3-14-85``, ``1985-03-14``, ``march 14th, 1985``, ``the
  fourteenth of march nineteen eighty five``, ``14 march 1985`` and month-day without a year,
  only when the nearest context word says birth (``dob``, ``d o b``, ``date of birth``, ``born``,
  ``birthday``).  A date whose nearest context word is a payment one (``due``, ``invoice``,
  ``paid``, ``statement`` ...) is left alone; so is a date with no context at all.
- **email**: written addresses, and spoken ones: ``<local> at <domain> dot <tld>`` where the local
  part is up to a few words joined by ``dot`` / ``underscore`` / ``dash`` or juxtaposed (``j smith
  at example dot co dot uk``), stopping at words like ``is``, ``my``, ``me``; the domain must end in
  a known TLD.  ``www`` domains are websites, not addresses.

"Context" is the nearest cue word in the 48 characters before a value (or, failing that, the 40
after); a payment/identifier cue closer to the value than a PII cue wins.

Overlaps: the longest finding wins, then card > ssn > phone > dob > email, so a card number is never
also a phone.  Findings are resolved over all kinds and then filtered by ``Redactor(kinds)``.
Redacting already redacted text changes nothing: placeholders are opaque to the detectors.

Deliberately not detected: money amounts, times, years on their own, counts, percentages, ZIP
codes, order/reference numbers that fail Luhn, dates without birth context, partial SSNs ("last
four"), card expiry dates and CVVs, street addresses and names.

Known limits: a spoken number run of 10+ digits with no context (an unlabelled order number read
digit by digit) may be redacted as a phone or SSN; the local part of a spoken e-mail is a guess and
may take one word too many or too few; numbers split by filler words (``"five five uh five"``)
break a run; dates are not checked against calendars (Feb 31 passes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pipelines.spoken_numbers import Normalized, normalize


class Kind(StrEnum):
    SSN = "ssn"
    CARD = "card"
    DOB = "dob"
    EMAIL = "email"
    PHONE = "phone"
    NUMBER = "number"  # partials only: 4+ digits not classifiable yet (``Redactor.redact_partial``)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    start: int  # span in the original text
    end: int


@dataclass(frozen=True, slots=True)
class Redacted:
    text: str  # each finding replaced by "[REDACTED:<kind>]"
    findings: tuple[Finding, ...]


_PRIORITY = {Kind.CARD: 0, Kind.SSN: 1, Kind.PHONE: 2, Kind.DOB: 3, Kind.EMAIL: 4, Kind.NUMBER: 5}
PLACEHOLDER = re.compile(r"\[REDACTED:(?:ssn|card|dob|email|phone|number)\]", re.IGNORECASE)
# A number still being spoken: four or more digits, single spaces, dots or dashes between them.
_PARTIAL_DIGITS = re.compile(r"\d(?:[ .\-]?\d){3,}")

# --- context cues (matched on the normalised, ASCII-lower-cased text) ---------------------------
_SSN_CUE = re.compile(r"\b(?:ssn|s\.? ?s\.? ?n|social|security number|tax id|taxpayer|itin)\b")
_PHONE_CUE = re.compile(
    r"\b(?:phone|cell|cellphone|mobile|call|calling|reach|text|telephone|landline|fax|area code|extension)\b")
_ID_CUE = re.compile(
    r"\b(?:order|reference|ref|account|acct|invoice|confirmation|case|ticket|tracking|claim|policy|member|routing"
    r"|transaction|loan|file|zip|zipcode|postal|serial|model|check|cheque|receipt|pin|id)\b")
_BIRTH_CUE = re.compile(r"\b(?:d\.? ?o\.? ?b|date of birth|birth ?date|birthday|born|birth)\b")
_PAYMENT_CUE = re.compile(
    r"\b(?:invoice|due|payment|payments|paid|pay|paying|statement|bill|billed|charged|charge|scheduled|deadline"
    r"|transaction|purchase|deposit|deposited|appointment|letter|sent|received|opened|closed|expires|expiry"
    r"|expiration|exp|settled|promised|today|tomorrow|yesterday)\b")
_BEFORE, _AFTER = 48, 40


def _context(norm: str, start: int, end: int, cue: re.Pattern[str], veto: re.Pattern[str] | None) -> int:
    """+1 if the nearest cue word says ``cue``, -1 if it says ``veto``, 0 if there is none."""
    window = norm[max(0, start - _BEFORE):start]
    last_cue = max((m.end() for m in cue.finditer(window)), default=-1)
    last_veto = max((m.end() for m in veto.finditer(window)), default=-1) if veto else -1
    if last_cue >= 0 or last_veto >= 0:
        return 1 if last_cue > last_veto else -1
    window = norm[end:end + _AFTER]
    m_cue, m_veto = cue.search(window), veto.search(window) if veto else None
    if m_cue is None and m_veto is None:
        return 0
    if m_veto is None or (m_cue is not None and m_cue.start() < m_veto.start()):
        return 1
    return -1


# --- digit runs ----------------------------------------------------------------------------------
_SEP = r"(?:[ \t]?[\-.][ \t]?|[ \t]|,[ \t]|\)[ \t]?[\-.]?[ \t]?)"
_RUN = re.compile(rf"(?<![\w.\-])(\+[ \t]?)?\(?\d+(?:{_SEP}\(?\d+)*(?![\w])")
_GROUP = re.compile(r"\d+")
_MONEY_BEFORE = re.compile(r"[$£€][ \t]?$")
_MONEY_AFTER = re.compile(r"[ \t]*(?:%|percent|dollars?|bucks|cents?|usd|pounds?|euros?|k\b)")
_MAX_DIGITS = 19
_AREA_CODE = re.compile(r"\barea code(?:[ \t]+is)?[ \t]*,?[ \t]*$")
_AREA_FILLER = re.compile(r"[ \t,.]*(?:(?:and|then|the|number|is|it's|rest|of|it|its)[ \t,.]+)*$")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ssa_valid(d: str) -> bool:
    area = d[:3]
    return area != "000" and area != "666" and area[0] != "9" and d[3:5] != "00" and d[5:] != "0000"


def _date_ok(month: int, day: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= 31


def _year_ok(year: str) -> bool:
    return len(year) == 2 or 1900 <= int(year) <= 2029


def _digits_are_date(d: str) -> bool:
    if len(d) == 6:
        return _date_ok(int(d[:2]), int(d[2:4])) or _date_ok(int(d[2:4]), int(d[:2]))
    return (_year_ok(d[4:]) and (_date_ok(int(d[:2]), int(d[2:4])) or _date_ok(int(d[2:4]), int(d[:2])))) or (
        _year_ok(d[:4]) and _date_ok(int(d[4:6]), int(d[6:])))


@dataclass(slots=True)
class _RunContext:
    ssn: int
    phone: int
    ident: int
    birth: int


def _classify(d: str, bounds: set[int], plus: bool, ctx: _RunContext) -> Kind | None:
    """The kind of one digit window ``d`` (``bounds``: digit counts at which the window has a break)."""
    n = len(d)
    if plus:
        return Kind.PHONE if 8 <= n <= 15 else None
    if 13 <= n <= _MAX_DIGITS and d[0] in "23456" and _luhn(d):
        return Kind.CARD
    if n == 9 and ctx.ident <= 0 and (ctx.ssn > 0 or ({3, 5} <= bounds and _ssa_valid(d))):
        return Kind.SSN
    if n in (6, 8) and ctx.birth > 0 and _digits_are_date(d):
        return Kind.DOB
    if ctx.ident > 0 and ctx.phone <= 0:
        return None
    if (n == 10 and d[0] not in "01") or (n == 11 and d[0] == "1" and d[1] not in "01"):
        return Kind.PHONE
    if (n == 11 and d[0] == "0" and len(bounds) > 0) or (d.startswith("00") and 10 <= n <= 17):
        return Kind.PHONE
    if d.startswith("011") and 12 <= n <= 18:
        return Kind.PHONE
    if n == 7 and ctx.phone > 0:
        return Kind.PHONE
    return None


def _digit_runs(norm: str) -> list[tuple[Kind, int, int]]:
    found: list[tuple[Kind, int, int]] = []
    prev_three: tuple[int, int] | None = None  # a 3-digit run after "area code"
    for run in _RUN.finditer(norm):
        start, end = run.span()
        if _MONEY_BEFORE.search(norm, max(0, start - 2), start) or _MONEY_AFTER.match(norm, end):
            continue
        groups = [(g.start(), g.end()) for g in _GROUP.finditer(norm, start, end)]
        total = sum(e - s for s, e in groups)
        if total < 6:
            if total == 3 and _AREA_CODE.search(norm, max(0, start - 20), start):
                prev_three = (start, end)
            continue
        plus = run.group(1) is not None
        ctx = _RunContext(
            ssn=_context(norm, start, end, _SSN_CUE, None),
            phone=_context(norm, start, end, _PHONE_CUE, None),
            ident=_context(norm, start, end, _ID_CUE, None),
            birth=_context(norm, start, end, _BIRTH_CUE, _PAYMENT_CUE),
        )
        if total == 7 and prev_three is not None and _AREA_FILLER.fullmatch(norm, prev_three[1], start):
            found.append((Kind.PHONE, prev_three[0], end))
            continue
        prev_three = None
        found.extend(_windows(norm, groups, start, end, plus, ctx))
    return found


def _windows(norm: str, groups: list[tuple[int, int]], start: int, end: int, plus: bool,
             ctx: _RunContext) -> list[tuple[Kind, int, int]]:
    """Classify the whole run, else its group-aligned sub-runs (longest first, non-overlapping)."""
    digits = [norm[s:e] for s, e in groups]
    n = len(groups)
    candidates: list[tuple[int, int, int, Kind]] = []  # (-digits, i, j, kind)
    for i in range(n):
        d = ""
        bounds: set[int] = set()
        for j in range(i, n):
            if j > i:
                bounds.add(len(d))
            d += digits[j]
            if len(d) > _MAX_DIGITS:
                break
            if len(d) < 6:
                continue
            kind = _classify(d, bounds, plus and i == 0, ctx)
            if kind is not None:
                if i == 0 and j == n - 1:
                    return [(kind, start, end)]
                candidates.append((-len(d), i, j, kind))
    candidates.sort()
    taken: list[tuple[int, int]] = []
    out: list[tuple[Kind, int, int]] = []
    for _, i, j, kind in candidates:
        if any(i <= tj and ti <= j for ti, tj in taken):
            continue
        taken.append((i, j))
        s = start if i == 0 else groups[i][0] - (norm[groups[i][0] - 1] == "(")
        e = groups[j][1] + (norm[groups[j][1]:groups[j][1] + 1] == ")")
        out.append((kind, s, e))
    return out


# --- dates ---------------------------------------------------------------------------------------
_MONTHS = {
    "january": 1, "february": 2, "march": 3, "april": 4, "may": 5, "june": 6, "july": 7, "august": 8,
    "september": 9, "october": 10, "november": 11, "december": 12, "jan": 1, "feb": 2, "mar": 3, "apr": 4,
    "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9, "oct": 10, "nov": 11, "dec": 12,
}
_MONTH = r"(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<day>[0-3]?\d)(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>1[ \t]?9[ \t]?\d[ \t]?\d|2[ \t]?0[ \t]?[0-2][ \t]?\d|'?\d\d)"
_GAP = r"[ \t]*,?[ \t]*"
_DATE_PATTERNS = (
    re.compile(rf"\b{_MONTH}{_GAP}(?:the[ \t]+)?{_DAY}(?:{_GAP}(?:of[ \t]+|in[ \t]+)?{_YEAR})?(?![\w])"),
    re.compile(rf"\b(?:the[ \t]+)?{_DAY}[ \t]+(?:of[ \t]+)?{_MONTH}(?:{_GAP}{_YEAR})?(?![\w])"),
    re.compile(r"(?<![\w/.\-])(?P<a>\d{1,2})(?P<sep>[/\-. ])(?P<b>\d{1,2})(?P=sep)(?P<year>\d{4}|\d{2})(?![\w/])"),
    re.compile(r"(?<![\w/.\-])(?P<year>\d{4})(?P<sep>[/\-.])(?P<a>\d{1,2})(?P=sep)(?P<b>\d{1,2})(?![\w/])"),
)


def _dates(norm: str) -> list[tuple[Kind, int, int]]:
    found: list[tuple[Kind, int, int]] = []
    for pattern in _DATE_PATTERNS:
        for m in pattern.finditer(norm):
            groups = m.groupdict()
            if "month" in groups:
                ok = 1 <= int(groups["day"]) <= 31
            else:
                a, b = int(groups["a"]), int(groups["b"])
                ok = _date_ok(a, b) or _date_ok(b, a)
                ok = ok and _year_ok(groups["year"])
            if ok and _context(norm, m.start(), m.end(), _BIRTH_CUE, _PAYMENT_CUE) > 0:
                found.append((Kind.DOB, m.start(), m.end()))
    return found


# --- e-mail --------------------------------------------------------------------------------------
_TLDS = (
    "com|net|org|edu|gov|mil|int|io|co|us|uk|ca|de|fr|au|nz|ie|in|info|biz|me|tv|ai|app|dev|mx|br|es|it|nl|jp|ch"
    "|se|xyz")
_WRITTEN_EMAIL = re.compile(r"(?<![\w.+\-])[a-z0-9][a-z0-9._%+\-]*@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}(?![\w])")
_SPOKEN_AT = re.compile(
    rf"[ \t]+(?:at|@)[ \t]+(?P<domain>(?:[a-z0-9\-]+[ \t]+(?:dot|period)[ \t]+)+(?:{_TLDS})"
    r"|[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,})(?![\w])")
_LOCAL_TOKEN = re.compile(r"[a-z0-9]+|[._\-]")
_JOINERS = frozenset({"dot", "period", "underscore", "dash", "hyphen", ".", "_", "-"})
_STOP = frozenset(
    "is was my email mail address it its me at to the and or use send write reach contact try um uh so that "
    "thats this our your his her their a an of on in by for from yes yeah okay ok sure please well like just say "
    "said via new old work personal account us them him online website site web portal pay go visit log login "
    "out up you we they be i can could would will here there as email's".split())
_MAX_LOCAL_WORDS = 4


def _emails(norm: str) -> list[tuple[Kind, int, int]]:
    found = [(Kind.EMAIL, m.start(), m.end()) for m in _WRITTEN_EMAIL.finditer(norm)] if "@" in norm else []
    if " at " not in norm and " @ " not in norm:
        return found
    for m in _SPOKEN_AT.finditer(norm):
        if m.group("domain").startswith("www"):
            continue
        start = _local_part_start(norm, m.start())
        if start is not None:
            found.append((Kind.EMAIL, start, m.end()))
    return found


def _local_part_start(norm: str, at: int) -> int | None:
    """Where the spoken local part ending at ``at`` begins, or None when there is none."""
    lo = max(0, at - 80)
    toks = [(t.group(), t.start()) for t in _LOCAL_TOKEN.finditer(norm, lo, at)]
    if not toks or toks[-1][0] in _STOP or toks[-1][0] in _JOINERS:
        return None

    def usable(k: int) -> bool:
        word, s = toks[k]
        e = s + len(word)
        gap = norm[e:toks[k + 1][1]]
        return word not in _STOP and gap.strip(" \t") == "" and norm[s - 1:s] not in ("'", "\u2019")

    k = len(toks) - 1
    start, words = toks[k][1], 1
    if norm[start - 1:start] in ("'", "\u2019"):
        return None
    while k > 0:
        word, s = toks[k - 1]
        if word in _JOINERS:
            if k < 2 or toks[k - 2][0] in _JOINERS or not usable(k - 2) or not (
                    norm[s + len(word):toks[k][1]].strip(" \t") == ""):
                break
            k -= 2
        elif words < _MAX_LOCAL_WORDS and usable(k - 1):
            k -= 1
            words += 1
        else:
            break
        start = toks[k][1]
    return start


# --- the redactor --------------------------------------------------------------------------------
class Redactor:
    """Finds PII of ``kinds`` in transcript text and replaces it by ``[REDACTED:<kind>]``.

    Thread-safe and stateless after construction; one instance can serve every call.
    """

    def __init__(self, kinds: frozenset[Kind] = frozenset(Kind)) -> None:
        self.kinds = frozenset(kinds)

    def find(self, text: str) -> tuple[Finding, ...]:
        """Non-overlapping findings of this redactor's kinds, as spans of ``text``, in order."""
        if not text:
            return ()
        norm = normalize(text, PLACEHOLDER)
        raw = _digit_runs(norm.text) + _dates(norm.text) + _emails(norm.text)
        return tuple(f for f in _resolve(raw, norm) if f.kind in self.kinds)

    def redact(self, text: str) -> Redacted:
        return _apply(text, self.find(text))

    def redact_partial(self, text: str) -> Redacted:
        """For a partial transcript: ``redact``, and then every run of four or more digits the rules could
        not classify is masked too (``[REDACTED:number]``).  A partial stops mid-number ("my card is
        4111 1111"): too short for a card yet, but half of one; it never reaches a translator, so
        masking a year or an amount for a moment costs nothing."""
        if not text:
            return Redacted(text, ())
        findings = list(self.find(text))
        norm = normalize(text, PLACEHOLDER)
        for m in _PARTIAL_DIGITS.finditer(norm.text):
            start, end = norm.to_original(m.start(), m.end())
            if all(end <= k.start or k.end <= start for k in findings):
                findings.append(Finding(Kind.NUMBER, start, end))
        return _apply(text, tuple(sorted(findings, key=lambda f: f.start)))


def _apply(text: str, findings: tuple[Finding, ...]) -> Redacted:
    """``text`` with each finding (in order, not overlapping) replaced by its marker."""
    if not findings:
        return Redacted(text, ())
    pieces: list[str] = []
    pos = 0
    for f in findings:
        pieces.append(text[pos:f.start])
        pieces.append(f"[REDACTED:{f.kind.value}]")
        pos = f.end
    pieces.append(text[pos:])
    return Redacted("".join(pieces), findings)


def _resolve(raw: list[tuple[Kind, int, int]], norm: Normalized) -> list[Finding]:
    """Map to original spans, then keep the longest (then most specific) of overlapping findings."""
    spans = [(kind, *norm.to_original(s, e)) for kind, s, e in raw]
    spans.sort(key=lambda f: (f[1] - f[2], _PRIORITY[f[0]], f[1]))
    kept: list[Finding] = []
    for kind, s, e in spans:
        if all(e <= k.start or k.end <= s for k in kept):
            kept.append(Finding(kind, s, e))
    kept.sort(key=lambda f: f.start)
    return kept


_DEFAULT = Redactor()


def redact(text: str) -> str:
    """``text`` with every kind of PII replaced (see ``Redactor``)."""
    return _DEFAULT.redact(text).text
