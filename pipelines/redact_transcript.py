"""Redaction of a whole transcript payload: its text and its timed words.

``pipelines.redaction`` finds PII in text.  A transcript also carries ``words`` with timings, and
those repeat the PII word by word ("four one one one ...").  Each word is located in the text (in
order); words inside a finding are replaced by one word ``[REDACTED:<kind>]`` spanning from the
first to the last of them.  A word that cannot be located while the text has findings is dropped:
when in doubt, nothing leaves unredacted.
"""

from __future__ import annotations

from typing import Any

from pipelines.redaction import Finding, Redactor


def redact_payload(redactor: Redactor, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A copy of ``payload`` with ``text`` and ``words`` redacted, and the number of findings."""
    text = payload.get("text") or ""
    result = redactor.redact(text)
    if not result.findings:
        return payload, 0
    out = dict(payload)
    out["text"] = result.text
    out["words"] = _redact_words(text, payload.get("words") or [], result.findings)
    return out, len(result.findings)


def _redact_words(text: str, words: list[dict[str, Any]], findings: tuple[Finding, ...]) -> list[dict[str, Any]]:
    lowered = text.lower()
    out: list[dict[str, Any]] = []
    cursor = 0
    current: Finding | None = None
    for w in words:
        token = str(w.get("word", "")).lower()
        at = lowered.find(token, cursor) if token else -1
        if at < 0:
            continue  # not locatable: dropped (see the module docstring)
        cursor = at + len(token)
        finding = next((f for f in findings if f.start < cursor and at < f.end), None)
        if finding is None:
            out.append(w)
            current = None
        elif finding is current and out:
            out[-1] = {**out[-1], "end": w.get("end", out[-1].get("end"))}
        else:
            out.append({**w, "word": f"[REDACTED:{finding.kind.value}]"})
            current = finding
    return out
