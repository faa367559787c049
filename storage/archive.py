"""Hot to cold: old calls' transcripts and translations move to the cold tier, and read back.

``archive_call``: the call's rows as gzip-compressed JSON lines (``{"t": "transcript" | "translation",
...row}``) under ``archive/<org>/<call>.jsonl.gz``; then, in one transaction, the call row names the
object (and when its newest line was written, and how many translation lines it holds: what the
retention policies need, migration 0017) and the rows are deleted.  Object first: a stop between the
two leaves the rows (the next run writes the same object again and finishes), never rows lost.
``read_archive`` gives them back in the shapes the call's detail uses.

Retention reaches the archive (storage/retention.py): past the transcripts policy the object is
deleted, then the call row forgets it; past the translations policy alone, ``drop_translations``
rewrites the object under the same key without them, then the row records 0.  The same key, written
whole (S3 and the local store replace an object atomically): a reader sees the old object or the new
one, and a stop between the object and the row leaves a row that overstates, which the next run
corrects (rewriting an object with no translations left is a no-op); never an object without its row.

Bounds: an archive is read whole, at most ``MAX_ARCHIVE_BYTES``.
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
    newest = max((r["created_at"] for r in transcripts + translations), default=None)
    async with conn.transaction():
        await conn.execute("UPDATE calls SET archive_key = $2, archived_at = now(), archive_lines_until = $3, "
                           "archive_translations = $4, updated_at = now() WHERE id = $1",
                           call_id, key, newest, len(translations))
        await conn.execute("DELETE FROM translations WHERE call_id = $1", call_id)
        await conn.execute("DELETE FROM transcriptions WHERE call_id = $1", call_id)
    return len(transcripts) + len(translations)


async def _read_rows(blobs: BlobStore, key: str) -> list[dict[str, Any]]:
    data = await blobs.get(key)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ValueError("archive too large to read whole")

    def decode() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in gzip.decompress(data).splitlines() if line]

    return await asyncio.to_thread(decode)


async def read_archive(blobs: BlobStore, key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(transcripts, translations) of an archived call."""
    rows = await _read_rows(blobs, key)
    return ([r for r in rows if r.get("t") == "transcript"], [r for r in rows if r.get("t") == "translation"])


async def drop_translations(blobs: BlobStore, key: str) -> int:
    """Rewrite the archive ``key`` without its translation lines; returns how many went (0: the object
    was left as it was).  The caller records that in the call row afterwards (the module docstring)."""
    rows = await _read_rows(blobs, key)
    kept = [r for r in rows if r.get("t") != "translation"]
    if len(kept) == len(rows):
        return 0
    await blobs.put(key, await asyncio.to_thread(_encode, kept), "application/gzip")
    return len(rows) - len(kept)
