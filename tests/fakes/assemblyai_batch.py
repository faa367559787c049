"""A fake of AssemblyAI's asynchronous transcript API on 127.0.0.1 (the parts batch transcription uses).

* every request needs ``authorization: <api key>`` (401 ``{"error"}`` otherwise);
* ``POST /v2/upload`` stores the body (at most ``max_upload`` bytes, else 413) and answers
  ``{"upload_url": "https://cdn.assemblyai.fake/upload/<id>"}``;
* ``POST /v2/transcript`` needs ``audio_url`` (one it issued, else the transcript ends in ``error`` as
  AssemblyAI's does for an unreachable URL), answers ``{"id", "status": "queued"}``;
* ``GET /v2/transcript/{id}``: ``processing`` for the first ``polls_before_done`` polls, then
  ``completed`` with ``utterances``: the script of each channel (``script[channel]``, a list of
  sentences), spread evenly over the uploaded WAV's duration (its header is read: a file that is not a
  WAV ends in ``error``), with word times; or ``error`` when ``fail_with`` is set.

Like a provider that missed some PII, it does not redact, whatever ``redact_pii`` says: what it
returns shows that our own redactor is the backstop.  ``requests`` records (method, path, JSON body).
"""

from __future__ import annotations

import io
import uuid
from types import TracebackType
from typing import Any

import soundfile
from aiohttp import web


class FakeAssemblyAIBatch:
    def __init__(self, port: int, script: dict[int, list[str]], *, api_key: str = "aai-test",
                 polls_before_done: int = 1, max_upload: int = 64 << 20) -> None:
        self.port = port
        self.script = script
        self.api_key = api_key
        self.polls_before_done = polls_before_done
        self.max_upload = max_upload
        self.fail_with: str | None = None
        self.requests: list[tuple[str, str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.transcripts: dict[str, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeAssemblyAIBatch:
        app = web.Application(client_max_size=self.max_upload + 1)
        app.router.add_post("/v2/upload", self._upload)
        app.router.add_post("/v2/transcript", self._create)
        app.router.add_get("/v2/transcript/{tid}", self._get)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _denied(self, request: web.Request) -> web.Response | None:
        if request.headers.get("authorization") != self.api_key:
            return web.json_response({"error": "Authentication error, API token missing/invalid"}, status=401)
        return None

    async def _upload(self, request: web.Request) -> web.Response:
        self.requests.append(("POST", request.path, None))
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.read()
        uid = uuid.uuid4().hex
        self.uploads[uid] = body
        return web.json_response({"upload_url": f"https://cdn.assemblyai.fake/upload/{uid}"})

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("POST", request.path, body))
        if (denied := self._denied(request)) is not None:
            return denied
        if not isinstance(body.get("audio_url"), str):
            return web.json_response({"error": "audio_url is required"}, status=400)
        tid = str(uuid.uuid4())
        self.transcripts[tid] = {"request": body, "polls": 0}
        return web.json_response({"id": tid, "status": "queued", "audio_url": body["audio_url"]})

    async def _get(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path, None))
        if (denied := self._denied(request)) is not None:
            return denied
        t = self.transcripts.get(request.match_info["tid"])
        if t is None:
            return web.json_response({"error": "Transcript ID not found"}, status=404)
        t["polls"] += 1
        if t["polls"] <= self.polls_before_done:
            return web.json_response({"id": request.match_info["tid"], "status": "processing"})
        if self.fail_with:
            return web.json_response({"id": request.match_info["tid"], "status": "error", "error": self.fail_with})
        uid = t["request"]["audio_url"].rsplit("/", 1)[-1]
        data = self.uploads.get(uid)
        if data is None:
            return web.json_response({"id": request.match_info["tid"], "status": "error",
                                      "error": "Download error, unable to download audio_url"})
        try:
            info = soundfile.info(io.BytesIO(data))
        except Exception:  # any unreadable file is AssemblyAI's "not audio" error
            return web.json_response({"id": request.match_info["tid"], "status": "error",
                                      "error": "File does not appear to contain audio"})
        duration_ms = int(info.frames * 1000 / info.samplerate)
        utterances = []
        for channel, sentences in self.script.items():
            span = duration_ms // max(1, len(sentences))
            for i, sentence in enumerate(sentences):
                words = sentence.split()
                step = max(1, (span - 200) // max(1, len(words)))
                start = i * span + 100
                ws = [{"text": w, "start": start + j * step, "end": start + (j + 1) * step - 20,
                       "confidence": 0.9, "channel": str(channel)} for j, w in enumerate(words)]
                utterances.append({"channel": str(channel), "start": ws[0]["start"], "end": ws[-1]["end"],
                                   "text": sentence, "confidence": 0.9, "words": ws, "speaker": chr(64 + channel)})
        return web.json_response({"id": request.match_info["tid"], "status": "completed",
                                  "text": " ".join(u["text"] for u in utterances), "utterances": utterances,
                                  "multichannel": True, "audio_channels": info.channels})
