"""Hot to cold: old calls' transcripts and translations move to the cold tier, and read back.

``archive_call``: the call's rows as gzip-compressed JSON lines (``{"t": "transcript" | "translation",
...row}``) under ``archive/<org>/<call>.jsonl.gz``; then, in one transaction, the call row names the
object and the rows are deleted.  Object first: a stop between the two leaves the rows (the next run
writes the same object again and finishes), never rows lost.  ``read_archive`` gives them back in the
shapes the call's detail uses.  Bounds: an archive is read whole, at most ``MAX_ARCHIVE_BYTES``.
"""

from __future__ import annotations

import asyncio
import gzip
import uuid
from typing import Any

import asyncpg
import orjson

from storage.blobs import BlobStore

MAX_ARCHIVE_BYTES = 64 << 20

TRANSCRIPT_COLUMNS = ("id, track, seq, text, language, confidence, start_ms, end_ms, provider, redacted, kind, "
                      "created_at, stream_id, words")
TRANSLATION_COLUMNS = ("id, transcription_id, source_lang, target_lang, original_text, translated_text, provider, "
                       "created_at")


def _encode(rows: list[dict[str, Any]]) -> bytes:
    return gzip.compress(b"".join(orjson.dumps(r, default=str) + b"\n" for r in rows), compresslevel=6)


async def archive_call(conn: asyncpg.Connection, blobs: BlobStore, org: uuid.UUID, call_id: uuid.UUID) -> int:
    """Move one call's lines to the cold tier; returns how many rows moved (``conn``: the tenant's)."""
    transcripts = [dict(r) | {"t": "transcript"} for r in await conn.fetch(
        f"SELECT {TRANSCRIPT_COLUMNS} FROM transcriptions WHERE call_id = $1 ORDER BY created_at, seq", call_id)]
    translations = [dict(r) | {"t": "translation"} for r in await conn.fetch(
        f"SELECT {TRANSLATION_COLUMNS} FROM translations WHERE call_id = $1 ORDER BY created_at", call_id)]
    key = f"archive/{org}/{call_id}.jsonl.gz"
    data = await asyncio.to_thread(_encode, transcripts + translations)
    await blobs.put(key, data, "application/gzip")
    async with conn.transaction():
        await conn.execute("UPDATE calls SET archive_key = $2, archived_at = now(), updated_at = now() WHERE id = $1",
                           call_id, key)
        await conn.execute("DELETE FROM translations WHERE call_id = $1", call_id)
        await conn.execute("DELETE FROM transcriptions WHERE call_id = $1", call_id)
    return len(transcripts) + len(translations)


async def read_archive(blobs: BlobStore, key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(transcripts, translations) of an archived call."""
    data = await blobs.get(key)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ValueError("archive too large to read whole")

    def decode() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in gzip.decompress(data).splitlines() if line]

    rows = await asyncio.to_thread(decode)
    return ([r for r in rows if r.get("t") == "transcript"], [r for r in rows if r.get("t") == "translation"])
