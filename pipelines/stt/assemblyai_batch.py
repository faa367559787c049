"""AssemblyAI's asynchronous transcript API, for a recording after the call.

The protocol (AssemblyAI's REST reference), as a table of steps:

    POST /v2/upload           body: the file's bytes              -> {"upload_url"}
    POST /v2/transcript       {"audio_url", "multichannel": true,  -> {"id", "status": "queued"}
                               "language_code", "redact_pii": true,
                               "redact_pii_policies": [...]}
    GET  /v2/transcript/{id}  (polled)                             -> status queued | processing
                                                                      | completed (utterances[{channel,
                                                                        start, end, text, words}]) | error

Header ``authorization: <API key>``.  The file is uploaded rather than handed over as a URL: our cold
tier is not reachable from AssemblyAI in every deployment (the embedded store is on loopback), and a
presigned URL would leave a credential for the recording in another service's logs.  PII redaction is
asked of AssemblyAI too (its transcript then never holds the numbers it heard); our own redactor runs on
what comes back all the same.

Bounds: the upload streams from the file; each request ``HTTP_TIMEOUT_S``; polling backs off from
``POLL_FIRST_S`` to ``POLL_MAX_S``; the whole transcript at most ``deadline_s``; answers are read up to
``MAX_ANSWER_BYTES``.  Errors: ``BatchError`` (``retry`` says whether trying again later may help:
network, 429, 5xx yes; 4xx and a transcript in ``error`` no).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

HTTP_TIMEOUT_S = 60.0
POLL_FIRST_S = 1.0
POLL_MAX_S = 15.0
MAX_ANSWER_BYTES = 64 << 20
PII_POLICIES = ["credit_card_number", "credit_card_cvv", "credit_card_expiration", "us_social_security_number",
                "date_of_birth", "email_address", "phone_number", "banking_information"]


class BatchError(Exception):
    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class BatchUtterance:
    channel: int  # 1-based, as AssemblyAI numbers channels
    start_ms: int
    end_ms: int
    text: str
    confidence: float
    words: tuple[tuple[str, int, int, float], ...]  # (text, start ms, end ms, confidence)


def parse_utterances(body: dict[str, Any]) -> list[BatchUtterance]:
    """The completed transcript's utterances; malformed items are skipped (never trusted)."""
    out = []
    for u in body.get("utterances") or []:
        if not isinstance(u, dict) or not isinstance(u.get("text"), str):
            continue
        try:
            channel = int(u.get("channel") or 1)
            words = tuple((str(w["text"])[:200], int(w["start"]), int(w["end"]), float(w.get("confidence") or 0.0))
                          for w in (u.get("words") or []) if isinstance(w, dict))
            out.append(BatchUtterance(channel, int(u["start"]), int(u["end"]), u["text"][:20_000],
                                      float(u.get("confidence") or 0.0), words[:5000]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class AssemblyAIBatch:
    def __init__(self, api_key: str, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session = session

    async def _request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        headers = {"authorization": self._key, **kw.pop("headers", {})}
        try:
            async with self._session.request(method, self.base_url + path, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S), **kw) as r:
                raw = await r.content.read(MAX_ANSWER_BYTES)
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BatchError(f"{method} {path}: {type(exc).__name__}", retry=True) from None
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = {}
        if status >= 300:
            detail = body.get("error") if isinstance(body, dict) else None
            raise BatchError(f"{method} {path}: HTTP {status} {str(detail or '')[:200]}",
                             retry=status == 429 or status >= 500)
        if not isinstance(body, dict):
            raise BatchError(f"{method} {path}: the answer is not an object", retry=True)
        return body

    async def transcribe(self, path: Path, *, language: str, deadline_s: float) -> list[BatchUtterance]:
        end = time.monotonic() + deadline_s
        async with asyncio.timeout(deadline_s):
            with path.open("rb") as f:  # aiohttp streams a file object in chunks
                up = await self._request("POST", "/v2/upload", data=f,
                                         headers={"Content-Type": "application/octet-stream"})
            url = up.get("upload_url")
            if not isinstance(url, str):
                raise BatchError("upload: no upload_url", retry=True)
            job = await self._request("POST", "/v2/transcript", json={
                "audio_url": url, "multichannel": True, "language_code": language, "redact_pii": True,
                "redact_pii_policies": PII_POLICIES, "redact_pii_sub": "entity_name"})
            tid = job.get("id")
            if not isinstance(tid, str) or not tid.isascii() or not 0 < len(tid) <= 100 or "/" in tid:
                raise BatchError("transcript: no valid id", retry=True)
            wait = POLL_FIRST_S
            while True:
                body = await self._request("GET", f"/v2/transcript/{tid}")
                status = body.get("status")
                if status == "completed":
                    return parse_utterances(body)
                if status == "error":
                    raise BatchError(f"transcript failed: {str(body.get('error'))[:200]}", retry=False)
                await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))
                wait = min(wait * 2, POLL_MAX_S)
