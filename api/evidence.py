"""Evidence bundles: one call, sealed, for a regulator or a court.

``POST /api/calls/{call_id}/evidence`` builds a zip of::

    recording-<n>.wav      each stored recording of the call, as stored
    transcript.txt         "[mm:ss] Speaker: text", live lines then the recording's
    transcript.json        every line with its kind, times and timed words
    translations.json      every translation
    audit.json             the call's audit trail
    summary.pdf            one page: the call, its summary and score, the files and their hashes
    manifest.json          {call, organisation, created, files: [{name, bytes, sha256}]}

and stores it in the cold tier (``evidence/<org>/<call>/<bundle>.zip``) with a row holding the zip's
and the manifest's SHA-256 (``evidence_bundles``, migration 0013: the application may insert and read
those rows, never change them, and since 0017 delete them only past ``retain_until``).
``GET .../evidence/{id}/verify`` downloads the object and recomputes: the zip's hash against the row,
the manifest's against the row, every file's against the manifest, and no file outside it.  Any
change to the stored object is reported, naming what differs.

Write-once: nothing in the application writes an evidence key twice (bundle ids are fresh) or deletes
one before ``retain_until`` (``SWITCHBOARD_EVIDENCE_RETAIN_DAYS``): erasure and the tenant wipe leave
``evidence/``, and the retention job deletes a bundle (object, then row) only once ``retain_until`` has
passed and its call is deleted, past the calls policy or gone (storage/retention.py).  The store is
told too: the bundle is put write-once (``If-None-Match: *``: an existing key is never replaced) and,
with ``SWITCHBOARD_S3_OBJECT_LOCK`` governance or compliance, with S3 Object Lock until
``retain_until``, so the store refuses to delete that version before then, whatever credentials the
application holds (compliance; governance yields to a principal allowed to bypass it).  The server
refuses to start when the lock is asked for and the bucket has none (storage/blobs.py).  The local
store keeps only the no-overwrite rule.

Bounds: at most ``MAX_RECORDING_BYTES`` of recordings per bundle (else 409), built in a temporary
directory and hashed a megabyte at a time (memory does not grow with the recordings), one bundle per
call at a time (a second request meanwhile: 409), and at most ``EVIDENCE_PER_ORG`` (2) seals and
verifies of an organisation at once on a node (one more: 429 + ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tempfile
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field

from api.envelope import ApiError, not_found
from api.rest import OrgSlots, Reply, Req, Route
from storage.archive import read_archive

MAX_RECORDING_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 16 << 20  # a stored manifest.json larger than this is a problem, not read
CHUNK = 1 << 20
SPEAKERS = {"inbound": "Consumer", "outbound": "Agent line", "agent": "Agent"}
# (organisation, call) whose bundle is being built on this node: call ids are unique per organisation only,
# so by the id alone one tenant's seal answered another's 409.
_building: set[tuple[uuid.UUID, str]] = set()
_slots = OrgSlots("evidence seals and verifies")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read a chunk at a time (bundles and recordings reach a gigabyte: never whole in memory)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _member_sha256(z: zipfile.ZipFile, name: str) -> str:
    h = hashlib.sha256()
    with z.open(name) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(call: dict[str, Any], files: dict[str, tuple[int, str]]) -> bytes:
    """The manifest's bytes: canonical JSON (sorted keys), so its hash is stable."""
    return orjson.dumps({"call_id": call["call_id"], "call_control_id": call["call_control_id"],
                         "org_id": call["org_id"], "created_at": call["created_at"],
                         "files": [{"name": n, "bytes": b, "sha256": h} for n, (b, h) in sorted(files.items())]},
                        option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)


def check(bundle: bytes | Path, expected_sha: str, expected_manifest_sha: str, *,
          digest: str | None = None) -> list[str]:
    """What differs between a bundle (its bytes, or its file, read a chunk at a time; ``digest``: its SHA-256
    if known) and its seal; empty when intact.  No I/O but reading the file."""
    problems = []
    digest = digest or (sha256(bundle) if isinstance(bundle, bytes) else file_sha256(bundle))
    if digest != expected_sha:
        problems.append("the bundle's SHA-256 differs from the one recorded when it was sealed")
    try:
        with zipfile.ZipFile(io.BytesIO(bundle) if isinstance(bundle, bytes) else bundle) as z:
            names = set(z.namelist())
            if "manifest.json" not in names:
                return [*problems, "manifest.json is missing"]
            if z.getinfo("manifest.json").file_size > MAX_MANIFEST_BYTES:
                return [*problems, "manifest.json is larger than any sealed one"]
            raw = z.read("manifest.json")
            if sha256(raw) != expected_manifest_sha:
                problems.append("manifest.json differs from the sealed one")
            listed = {f["name"]: f for f in orjson.loads(raw)["files"]}
            for name, f in sorted(listed.items()):
                if name not in names:
                    problems.append(f"{name} is missing")
                elif _member_sha256(z, name) != f["sha256"]:
                    problems.append(f"{name} differs from its manifest hash")
            for extra in sorted(names - set(listed) - {"manifest.json"}):
                problems.append(f"{extra} is not in the manifest")
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        problems.append(f"the bundle cannot be read as a sealed zip ({type(exc).__name__})")
    return problems


def _pdf(call: dict[str, Any], summary: dict[str, Any] | None, files: dict[str, tuple[int, str]]) -> bytes:
    from fpdf import FPDF

    def latin(text: str) -> str:  # the core fonts are Latin-1
        return text.replace("“", '"').replace("”", '"').encode("latin-1", "replace").decode("latin-1")

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, 15)
    pdf.add_page()
    pdf.set_font("helvetica", "B", 14)
    pdf.cell(0, 10, latin(f"Call evidence: {call['call_control_id']}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", size=9)
    for label, key in (("Organisation", "org_id"), ("Call id", "call_id"), ("Status", "status"),
                       ("Started", "started_at"), ("Ended", "ended_at"), ("Ended because", "end_reason"),
                       ("Sealed", "created_at")):
        pdf.cell(0, 5, latin(f"{label}: {call.get(key) or '-'}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.set_font("helvetica", "B", 11)
    pdf.cell(0, 7, "Summary", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", size=9)
    if summary:
        pdf.multi_cell(0, 5, latin(summary["summary"]), new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 5, latin("Score: " + orjson.dumps(summary["score"]).decode()), new_x="LMARGIN",
                       new_y="NEXT")
        by = f"a model ({summary['model']})" if summary.get("engine") == "llm" else "the offline rules"
        pdf.cell(0, 5, latin(f"Written by {by} from the redacted transcript."), new_x="LMARGIN", new_y="NEXT")
    else:
        pdf.cell(0, 5, "No summary was written for this call.", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.set_font("helvetica", "B", 11)
    pdf.cell(0, 7, "Files (SHA-256)", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("courier", size=7)
    for name, (size, digest) in sorted(files.items()):
        pdf.cell(0, 4, latin(f"{name}  {size} bytes  {digest}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", size=8)
    pdf.ln(2)
    pdf.multi_cell(0, 4, "manifest.json lists every file with its SHA-256; the manifest's own SHA-256 and the "
                   "bundle's are recorded by the platform when sealed and checked by its verify operation.",
                   new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _build(workdir: Path, call: dict[str, Any], texts: dict[str, bytes], recordings: list[Path],
           summary: dict[str, Any] | None) -> tuple[Path, bytes, int]:
    """Write the zip (in a thread: hashing and deflating megabytes); returns (path, manifest, files)."""
    files: dict[str, tuple[int, str]] = {}
    contents: dict[str, bytes | Path] = dict(texts)
    for i, rec in enumerate(recordings, 1):
        contents[f"recording-{i}.wav"] = rec
    for name, item in contents.items():
        files[name] = (item.stat().st_size, file_sha256(item)) if isinstance(item, Path) else (len(item), sha256(item))
    pdf = _pdf(call, summary, files)
    contents["summary.pdf"] = pdf
    files["summary.pdf"] = (len(pdf), sha256(pdf))
    man = manifest(call, files)
    path = workdir / "bundle.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(contents):
            item = contents[name]
            if isinstance(item, Path):
                z.write(item, name, compress_type=zipfile.ZIP_STORED)  # audio does not deflate
            else:
                z.writestr(name, item)
        z.writestr("manifest.json", man)
    return path, man, len(files) + 1


def _timestamp(ms: int | None) -> str:
    s = (ms or 0) // 1000
    return f"{s // 60:02d}:{s % 60:02d}"


class BundleOut(BaseModel):
    id: uuid.UUID
    call_id: str = Field(description="the call_control_id")
    bytes: int
    sha256: str
    manifest_sha256: str
    files: int
    retain_until: datetime
    created_at: datetime


class VerifyOut(BaseModel):
    intact: bool
    problems: list[str]
    sha256: str = Field(description="the stored object's SHA-256 now")


_COLUMNS = "id, call_control_id AS call_id, bytes, sha256, manifest_sha256, files, retain_until, created_at"


async def create_bundle(req: Req) -> Reply:
    with _slots.hold(req.p.org_id, req.rt.settings.evidence_per_org):
        return await _create_bundle(req)


async def _create_bundle(req: Req) -> Reply:
    tiers = req.rt.tiers
    assert tiers is not None
    org, ccid = req.p.org_id, req.params["call_id"]
    async with tiers.db.tenant(org) as conn:
        call = await conn.fetchrow(
            "SELECT id, call_control_id, status, started_at, ended_at, end_reason, archive_key FROM calls "
            "WHERE call_control_id = $1 AND deleted_at IS NULL", ccid)
        if call is None:
            raise not_found("call")
        if call["status"] in ("initiating", "ringing", "active", "ending"):
            raise ApiError("conflict", "the call is still open: seal it once it has ended")
        recs = await conn.fetch("SELECT storage_key, bytes FROM recordings WHERE call_id = $1 AND deleted_at IS NULL "
                                "ORDER BY created_at", call["id"])
        lines = await conn.fetch(
            "SELECT track, seq, kind, text, language, start_ms, end_ms, words, provider FROM transcriptions "
            "WHERE call_id = $1 AND deleted_at IS NULL ORDER BY kind = 'batch', coalesce(start_ms, 0), seq",
            call["id"])
        translations = await conn.fetch(
            "SELECT source_lang, target_lang, original_text, translated_text, provider, created_at FROM translations "
            "WHERE call_id = $1 AND deleted_at IS NULL ORDER BY created_at", call["id"])
        audit = await conn.fetch(
            "SELECT created_at, actor_type, actor_id, action, resource_type, resource_id, old_value, new_value "
            "FROM audit_logs WHERE resource_id IN ($1, $2) OR new_value->>'call_id' = $1 ORDER BY created_at",
            str(call["id"]), ccid)
        summary = await conn.fetchrow("SELECT summary, score, engine, model FROM call_summaries WHERE call_id = $1",
                                      call["id"])
    if call["archive_key"]:  # its lines are in the cold tier (storage/archive.py)
        kept, translated = await read_archive(tiers.blobs, call["archive_key"])
        lines = sorted(kept, key=lambda r: (r.get("kind") == "batch", r.get("start_ms") or 0, r["seq"]))
        translations = translated
    if sum(r["bytes"] for r in recs) > MAX_RECORDING_BYTES:
        raise ApiError("conflict", "the call's recordings are too large for one bundle")
    if (org, ccid) in _building:
        raise ApiError("conflict", "a bundle of this call is being sealed; retry in a moment",
                       headers={"Retry-After": "5"})
    _building.add((org, ccid))
    try:
        bundle_id = uuid.uuid4()
        created = datetime.now(UTC)
        facts = {"call_id": str(call["id"]), "call_control_id": ccid, "org_id": str(org),
                 "created_at": created.isoformat(), "status": call["status"],
                 "started_at": call["started_at"].isoformat() if call["started_at"] else None,
                 "ended_at": call["ended_at"].isoformat() if call["ended_at"] else None,
                 "end_reason": call["end_reason"]}
        text = "\n".join(f"[{_timestamp(r['start_ms'])}] {SPEAKERS.get(r['track'], r['track'])}"
                         f"{' (from the recording)' if r['kind'] == 'batch' else ''}: {r['text']}" for r in lines)
        texts = {
            "transcript.txt": (text + "\n").encode(),
            "transcript.json": orjson.dumps([dict(r) for r in lines], option=orjson.OPT_INDENT_2),
            "translations.json": orjson.dumps([dict(r) for r in translations], option=orjson.OPT_INDENT_2),
            "audit.json": orjson.dumps([dict(r) for r in audit], option=orjson.OPT_INDENT_2),
        }
        with tempfile.TemporaryDirectory(prefix="switchboard-evidence-") as tmp:
            work = Path(tmp)
            paths = []
            for i, r in enumerate(recs, 1):
                path = work / f"rec-{i}.wav"
                await tiers.blobs.get_file(r["storage_key"], path)
                paths.append(path)
            zip_path, man, files = await asyncio.to_thread(
                _build, work, facts, texts, paths, dict(summary) if summary else None)
            size = (await asyncio.to_thread(zip_path.stat)).st_size
            digest = await asyncio.to_thread(file_sha256, zip_path)
            key = f"evidence/{org}/{call['id']}/{bundle_id}.zip"
            retain = created + timedelta(days=req.rt.settings.evidence_retain_days)
            # Write-once: never replaces a key, and with SWITCHBOARD_S3_OBJECT_LOCK the store itself
            # refuses to delete this version before retain_until (storage/blobs.py).
            await tiers.blobs.put_file(key, zip_path, "application/zip", retain_until=retain)
        async with tiers.db.tenant(org) as conn:
            row = await conn.fetchrow(
                "INSERT INTO evidence_bundles (id, org_id, call_id, call_control_id, storage_key, bytes, sha256, "
                f"manifest_sha256, files, retain_until, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                f"$11) RETURNING {_COLUMNS}",
                bundle_id, org, call["id"], ccid, key, size, digest, sha256(man), files, retain, req.p.subject)
            await req.audit("evidence.sealed", "call", call["id"], None,
                            {"bundle_id": str(bundle_id), "sha256": digest, "files": files}).apply(conn)
    finally:
        _building.discard((org, ccid))
    return Reply(BundleOut.model_validate(dict(row)).model_dump(mode="json"), status=201)


async def _bundle(req: Req) -> Any:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow(f"SELECT {_COLUMNS}, storage_key FROM evidence_bundles WHERE id = $1 "
                                  "AND call_control_id = $2", req.params["bundle_id"], req.params["call_id"])
    if row is None:
        raise not_found("evidence bundle")
    return row


async def list_bundles(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM evidence_bundles WHERE call_control_id = $1 "
                                "ORDER BY created_at DESC LIMIT 100", req.params["call_id"])
    return Reply({"items": [BundleOut.model_validate(dict(r)).model_dump(mode="json") for r in rows],
                  "next_cursor": None})


async def verify_bundle(req: Req) -> Reply:
    with _slots.hold(req.p.org_id, req.rt.settings.evidence_per_org):
        return await _verify_bundle(req)


async def _verify_bundle(req: Req) -> Reply:
    row = await _bundle(req)
    tiers = req.rt.tiers
    assert tiers is not None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="switchboard-verify-") as tmp:
        path = Path(tmp) / "bundle.zip"
        await tiers.blobs.get_file(row["storage_key"], path)
        digest = await asyncio.to_thread(file_sha256, path)
        problems = await asyncio.to_thread(check, path, row["sha256"], row["manifest_sha256"], digest=digest)
    async with tiers.db.tenant(req.p.org_id) as conn:
        await req.audit("evidence.verified", "evidence_bundle", row["id"], None,
                        {"intact": not problems, "problems": len(problems),
                         "ms": round((time.monotonic() - started) * 1000)}).apply(conn)
    return Reply(VerifyOut(intact=not problems, problems=problems, sha256=digest).model_dump())


async def bundle_url(req: Req) -> Reply:
    row = await _bundle(req)
    assert req.rt.tiers is not None
    expires = 900
    url = await req.rt.tiers.blobs.presign_get(row["storage_key"], expires_s=expires)
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        await req.audit("evidence.url_issued", "evidence_bundle", row["id"], None, {"expires_in": expires}).apply(conn)
    return Reply({"url": url, "expires_in": expires}, headers={"Cache-Control": "no-store"})


_CALL = (("call_id", "call_id"),)
_BUNDLE = (("call_id", "call_id"), ("bundle_id", "uuid"))
ROUTES = [
    Route("POST", "/api/calls/{call_id}/evidence", "seal_evidence", "Seal an evidence bundle of an ended call",
          "evidence", "action", "evidence.write", create_bundle, params=_CALL, response=BundleOut, status=201,
          errors=("not_found", "conflict"), max_body=1024,
          description="A zip of the recordings, transcripts (text and JSON with word times), translations, the "
                      "audit trail, a PDF summary page and manifest.json (every file's SHA-256), stored "
                      "write-once; its own and its manifest's SHA-256 are recorded.  At most `EVIDENCE_PER_ORG` "
                      "(2) seals and verifies of an organisation at once on a node; one more is 429."),
    Route("GET", "/api/calls/{call_id}/evidence", "list_evidence", "A call's evidence bundles", "evidence", "action",
          "evidence.read", list_bundles, params=_CALL, response=BundleOut, paged=True),
    Route("GET", "/api/calls/{call_id}/evidence/{bundle_id}/verify", "verify_evidence",
          "Recompute a bundle's hashes against its seal", "evidence", "action", "evidence.read", verify_bundle,
          params=_BUNDLE, response=VerifyOut, errors=("not_found",)),
    Route("GET", "/api/calls/{call_id}/evidence/{bundle_id}/url", "evidence_url",
          "A signed download URL for a bundle (15 minutes)", "evidence", "action", "evidence.read", bundle_url,
          params=_BUNDLE, errors=("not_found",)),
]
