"""Offline English<->Spanish translation with Apertium, one long-lived process per direction.

What we found by experiment (apertium 3.8.3, apertium-eng-spa 0.8.1, Debian 12, 2-core VM):

* Modes: ``apertium -l`` lists ``eng-spa``, ``spa-eng`` and ``spa-eng_US``
  (``/usr/share/apertium/modes/*.mode``).
* ``apertium -z eng-spa`` does **not** work as a long-lived process here: the wrapper script puts
  ``apertium-destxt`` / ``apertium-retxt`` and a ``gawk`` filter around the pipeline, and in this
  version they swallow the NUL byte and buffer their output, so nothing comes back until stdin is
  closed.  The translation pipeline itself honours null-flush: ``apertium-wblank-mode -z <mode
  file>`` prints it with ``-z`` on every stage (``lt-proc -z ... | apertium-tagger -z ... | ...``,
  12 stages for eng-spa), and it answers each request ``<text>\\0`` with ``<translation>\\0``.  So
  we start those stages ourselves, chained by pipes (``$1=-g``: mark unknown
  words), and do destxt/retxt's job in Python (``apertium_format``).  Starting them directly rather
  than under ``bash -c`` keeps every stage our child, so killed stages are reaped even where PID 1
  does not reap orphans (a container without an init).  "The process" of a direction below is
  that set of stages, killed stage by stage.
* Reserved characters must be escaped: an unescaped ``@`` or ``$`` makes ``lt-proc`` print
  "Malformed input stream" and every later answer of that process is empty.  Anything on the
  process's stderr is logged, and an "Error"/"Malformed" line retires the process (the next request
  starts a new one); an answer that lost the ``.[]`` end mark every request carries counts as a
  dead process (below).
* Newlines inside a text travel as superblanks (``[\\n]``) and come back in place; unknown words
  come back marked (``*Xzqwerty``; ``#`` and ``@`` for generation and transfer gaps): the marks are
  stripped and the word kept.  Pro-drop leaves double spaces ("and I live" -> "y  vivo"); collapsed.
* Redaction markers (``[REDACTED:phone]``, ``markers``) are sent as superblanks, so they come back
  untranslated and in place (without that, Apertium answers ``[*REDACTED:teléfono]``).  The answer is
  checked all the same (``markers.kept``); one that lost or changed a marker raises
  ``TranslationError`` (never seen: superblanks are carried through every stage).
* Timings: start-up (spawn of the stages to the first answer, dictionaries loaded) 60-115 ms per
  direction (eng-spa ~80 ms, spa-eng ~60 ms; both in parallel ~130 ms on 2 cores); a
  short sentence then takes 0.5-2.5 ms per call (mean of 50 sequential sentences ~1 ms, printed by
  the tests), against 0.09-0.13 s for one ``apertium eng-spa`` process per sentence.

Contract, per direction:

* ``start()`` spawns each process and waits for a warm-up answer, so no live call pays start-up.
  ``translate`` without ``start()`` spawns on first use.
* Requests are written and answered one at a time under a lock (asyncio's lock is FIFO, so order
  is preserved); at most ``max_pending`` may wait for it, past that ``translate`` raises
  ``TranslationError("... busy")`` at once.  Waiting counts against the deadline.
* A process that has died (seen as EOF, a broken pipe, or an answer without its end mark) is
  restarted and the request written to it is tried once more on the new one (translation is
  idempotent); a second failure fails the request.  A process that does not answer by the
  deadline is killed, a new one is started and the request raises ``TranslationTimeout`` (so a
  deadline far too short for the text also costs a restart, ~60 ms).  A request cancelled
  mid-answer retires the process too, since its next answer would belong to the wrong caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import SwitchboardError
from pipelines.translate import markers
from pipelines.translate.apertium_format import END_MARK, deformat, reformat
from pipelines.translate.base import Translation, TranslationError, TranslationTimeout, Translator, normalise_lang

log = logging.getLogger("switchboard.translate.apertium")

# ISO 639-1 -> the ISO 639-3 codes Apertium names its modes with.
APERTIUM_CODES = {"en": "eng", "es": "spa", "ca": "cat", "fr": "fra", "pt": "por", "it": "ita", "de": "deu"}

MAX_CHARS = 20_000  # per request: bounds what one answer can hold in the pipe and the reader
_READ_LIMIT = 1 << 20
_STDERR_LINE_LIMIT = 500
_REAP_TIMEOUT_S = 5.0


def mode_name(source_lang: str, target_lang: str) -> str:
    try:
        return f"{APERTIUM_CODES[source_lang]}-{APERTIUM_CODES[target_lang]}"
    except KeyError as exc:
        raise TranslationError(f"apertium: no mode name for {source_lang!r} -> {target_lang!r}") from exc


class _ProcessLost(SwitchboardError):
    """The process died or was retired before answering."""


@dataclass(eq=False)
class _Direction:
    mode: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    stages: list[asyncio.subprocess.Process] = field(default_factory=list)  # one process per pipeline stage
    stderr_task: asyncio.Task[None] | None = None
    broken: bool = False  # the running pipeline reported a stream error on stderr
    spawns: int = 0

    def alive(self) -> bool:
        return bool(self.stages) and all(p.returncode is None for p in self.stages)


class ApertiumTranslator(Translator):
    name = "apertium"

    def __init__(
        self,
        *,
        pairs: Sequence[tuple[str, str]] = (("en", "es"), ("es", "en")),
        binary: str = "apertium",
        max_pending: int = 64,
        datadir: str | None = None,
    ) -> None:
        """``binary`` locates the installation (its directory holds the pipeline's programs);
        ``datadir`` defaults to ``$APERTIUM_DATADIR`` or ``<prefix>/share/apertium``."""
        self._pairs = {(normalise_lang(s), normalise_lang(t)) for s, t in pairs}
        self._binary = binary
        self._datadir = datadir
        self._max_pending = max_pending
        self._dirs = {pair: _Direction(mode_name(*pair)) for pair in self._pairs}
        self._pipelines: dict[str, list[list[str]]] = {}
        self._reapers: set[asyncio.Task[None]] = set()
        self._closed = False

    def supports(self, source_lang: str, target_lang: str) -> bool:
        return (normalise_lang(source_lang), normalise_lang(target_lang)) in self._pairs

    def process_id(self, source_lang: str, target_lang: str) -> int | None:
        """The first stage's pid of a direction's running pipeline, if any (it names the pipeline)."""
        d = self._dirs.get((normalise_lang(source_lang), normalise_lang(target_lang)))
        return d.stages[0].pid if d is not None and d.alive() else None

    def stage_pids(self, source_lang: str, target_lang: str) -> list[int]:
        """Every stage's pid of a direction's running pipeline (for tests that kill or stop it)."""
        d = self._dirs.get((normalise_lang(source_lang), normalise_lang(target_lang)))
        return [p.pid for p in d.stages] if d is not None and d.alive() else []

    def spawn_count(self, source_lang: str, target_lang: str) -> int:
        return self._dirs[(normalise_lang(source_lang), normalise_lang(target_lang))].spawns

    async def start(self) -> None:
        """Spawn every direction and wait until each has answered once (dictionaries loaded)."""
        await asyncio.gather(*(self._warm(d) for d in self._dirs.values()))

    async def _warm(self, d: _Direction) -> None:
        async with d.lock:
            if not d.stages:
                await self._spawn(d)
            try:
                await asyncio.wait_for(self._exchange(d, deformat("")), 30)
            except (TimeoutError, _ProcessLost) as exc:
                self._retire(d)
                raise TranslationError(f"apertium: {d.mode} did not start") from exc

    async def translate(self, text: str, source_lang: str, target_lang: str, *, deadline_s: float) -> Translation:
        started = time.monotonic()
        src, tgt = self.check_pair(source_lang, target_lang)
        if self._closed:
            raise TranslationError("apertium: translator is closed")
        if len(text) > MAX_CHARS:
            raise TranslationError(f"apertium: text of {len(text)} chars is over the {MAX_CHARS} limit")
        request = deformat(text, keep=markers.PLACEHOLDER)
        d = self._dirs[(src, tgt)]
        if d.waiting >= self._max_pending:
            raise TranslationError(f"apertium: {d.mode} is busy ({d.waiting} requests waiting)")
        deadline = asyncio.get_running_loop().time() + deadline_s
        d.waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await d.lock.acquire()
        except TimeoutError:
            raise TranslationTimeout(f"apertium: deadline of {deadline_s:.3f} s passed waiting for {d.mode}") from None
        finally:
            d.waiting -= 1
        try:
            answer = await self._translate_locked(d, request, deadline, deadline_s)
        finally:
            d.lock.release()
        translated = reformat(answer)
        if not markers.kept(text, translated):
            self.markers_lost += 1
            raise TranslationError(f"apertium: {d.mode} changed the redaction markers")
        return Translation(text, translated, src, tgt, self.name, (time.monotonic() - started) * 1000)

    async def _translate_locked(self, d: _Direction, request: str, deadline: float, deadline_s: float) -> str:
        for attempt in (1, 2):
            if asyncio.get_running_loop().time() >= deadline:
                # Nothing written yet: fail without retiring a healthy process.
                raise TranslationTimeout(f"apertium: deadline of {deadline_s:.3f} s passed before {d.mode} was free")
            if not d.alive() or d.broken:
                self._retire(d)
                await self._spawn(d)
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._exchange(d, request)
            except TimeoutError:
                self._retire(d)
                await self._spawn(d)
                raise TranslationTimeout(f"apertium: {d.mode} gave no answer within {deadline_s:.3f} s") from None
            except _ProcessLost as exc:
                log.warning("apertium %s process lost (%s), attempt %d", d.mode, exc, attempt)
                self._retire(d)
                if attempt == 2:
                    await self._spawn(d)
                    raise TranslationError(f"apertium: {d.mode} failed twice on this request ({exc})") from exc
            except BaseException:
                # Cancelled mid-answer: the process may still answer, and that answer would go to
                # the next caller.
                self._retire(d)
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, d: _Direction, request: str) -> str:
        stdin = d.stages[0].stdin if d.stages else None
        stdout = d.stages[-1].stdout if d.stages else None
        if stdin is None or stdout is None:
            raise _ProcessLost("not running")
        try:
            stdin.write(request.encode() + b"\0")
            await stdin.drain()
            answer = await stdout.readuntil(b"\0")
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ProcessLost(f"stdin closed: {exc}") from exc
        except asyncio.IncompleteReadError as exc:
            raise _ProcessLost(f"stdout closed after {len(exc.partial)} bytes") from exc
        except asyncio.LimitOverrunError as exc:
            raise _ProcessLost("answer over the read limit") from exc
        text = answer[:-1].decode(errors="replace")
        if request.endswith(END_MARK) and "[]" not in text:
            # A healthy pipeline carries the end mark through; a stream error truncates or empties
            # the answer (and every later one).
            raise _ProcessLost(f"answer without its end mark: {text[:60]!r}")
        return text

    def _resolve(self) -> tuple[Path, Path]:
        found = shutil.which(self._binary)
        if found is None:
            raise TranslationError(f"apertium: {self._binary!r} not found on PATH (apt-get install apertium)")
        bindir = Path(found).resolve().parent
        datadir = Path(self._datadir or os.environ.get("APERTIUM_DATADIR") or bindir.parent / "share" / "apertium")
        return bindir, datadir

    async def _pipeline(self, mode: str) -> list[list[str]]:
        """The argv of each stage of the mode's pipeline, with null-flush (``-z``) on every stage.

        ``apertium-wblank-mode -z <mode file>`` prints the pipeline as ``prog 'arg' ... | prog ...``
        with ``$1`` (generation option: ``-g``, mark unknown words) and ``$2`` (tagger option: none).
        """
        if mode in self._pipelines:
            return self._pipelines[mode]
        bindir, datadir = self._resolve()
        mode_file = datadir / "modes" / f"{mode}.mode"
        if not mode_file.exists():
            available = sorted(p.stem for p in (datadir / "modes").glob("*.mode"))
            raise TranslationError(f"apertium: mode {mode!r} not installed (available: {available})")
        proc = await asyncio.create_subprocess_exec(
            str(bindir / "apertium-wblank-mode"),
            "-z",
            str(mode_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0 or not out.strip():
            raise TranslationError(f"apertium: apertium-wblank-mode failed for {mode}: {err.decode(errors='replace')}")
        stages: list[list[str]] = [[]]
        for token in shlex.split(out.decode()):
            if token == "|":
                stages.append([])
            elif token == "$1":
                stages[-1].append("-g")
            elif token != "$2":
                stages[-1].append(token)
        for argv in stages:
            if not argv or any(ch in tok for tok in argv for ch in "<>&;$`"):
                raise TranslationError(f"apertium: cannot run the {mode} pipeline: {out.decode()[:200]!r}")
            argv[0] = shutil.which(argv[0], path=str(bindir)) or shutil.which(argv[0]) or argv[0]
        self._pipelines[mode] = stages
        return stages

    async def _spawn(self, d: _Direction) -> None:
        """Start the stages, chained by pipes."""
        if self._closed:
            raise TranslationError("apertium: translator is closed")
        stages = await self._pipeline(d.mode)
        env = dict(os.environ, LC_ALL="C.UTF-8")  # the stages read and write UTF-8 only under a UTF-8 locale
        procs: list[asyncio.subprocess.Process] = []
        upstream: int | None = None  # read end of the pipe from the previous stage
        try:
            for i, argv in enumerate(stages):
                last = i == len(stages) - 1
                read_end, write_end = (None, None) if last else os.pipe()
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *argv,
                        stdin=asyncio.subprocess.PIPE if upstream is None else upstream,
                        stdout=asyncio.subprocess.PIPE if write_end is None else write_end,
                        stderr=asyncio.subprocess.PIPE,
                        env=env,
                        limit=_READ_LIMIT,
                        # No process group (process_group= is not supported by uvloop, which the server
                        # runs on, and preexec_fn is unsafe with threads): _kill signals every stage.
                    )
                finally:
                    for fd in (upstream, write_end):
                        if fd is not None:
                            os.close(fd)
                    upstream = read_end
                procs.append(proc)
        except OSError as exc:
            if upstream is not None:
                os.close(upstream)
            self._kill(d.mode, procs)
            raise TranslationError(f"apertium: cannot start {d.mode}: {exc}") from exc
        d.stages, d.broken = procs, False
        d.spawns += 1
        d.stderr_task = asyncio.create_task(self._watch_stderr(d, procs), name=f"apertium-{d.mode}-stderr")
        log.info("apertium %s started (first pid %d, %d stages)", d.mode, procs[0].pid, len(procs))

    async def _watch_stderr(self, d: _Direction, procs: list[asyncio.subprocess.Process]) -> None:
        async def watch(proc: asyncio.subprocess.Process) -> None:
            assert proc.stderr is not None
            while True:
                try:
                    line = await proc.stderr.readline()
                except ValueError:
                    line = b"(stderr line over the read limit)"
                if not line:
                    return
                text = line.decode(errors="replace").strip()[:_STDERR_LINE_LIMIT]
                log.warning("apertium %s (pid %d) stderr: %s", d.mode, proc.pid, text)
                if ("Error" in text or "Malformed" in text) and d.stages is procs:
                    d.broken = True

        await asyncio.gather(*(watch(p) for p in procs))

    def _retire(self, d: _Direction) -> None:
        """Kill the direction's pipeline now and reap it in the background."""
        procs, task = d.stages, d.stderr_task
        d.stages, d.stderr_task, d.broken = [], None, False
        if procs:
            self._kill(d.mode, procs, task)

    def _kill(
        self, mode: str, procs: list[asyncio.subprocess.Process], stderr_task: asyncio.Task[None] | None = None
    ) -> None:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # SIGKILL also ends a stopped (hung) process
        reaper = asyncio.create_task(self._reap(procs, stderr_task), name=f"apertium-{mode}-reap")
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    @staticmethod
    async def _reap(procs: list[asyncio.subprocess.Process], stderr_task: asyncio.Task[None] | None) -> None:
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), _REAP_TIMEOUT_S)
            except TimeoutError:
                log.error("apertium pid %d did not exit after SIGKILL", proc.pid)
        if stderr_task is not None:
            stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stderr_task

    async def aclose(self) -> None:
        self._closed = True
        for d in self._dirs.values():
            self._retire(d)
        while self._reapers:
            await asyncio.gather(*list(self._reapers), return_exceptions=True)
