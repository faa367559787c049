"""pocketsphinx decoders in worker processes.

pocketsphinx holds the GIL inside ``Decoder()`` and ``process_raw`` (measured: a decoder thread
stalled the event loop 50 ms per 1.5 s of decoding, and 0.3 s per decoder created), so running it
in a thread keeps it off the event loop's code path but not off its time.  Each decoder therefore
lives in a process of its own: ``DecoderProcess`` wraps a one-worker ``ProcessPoolExecutor``
(spawned, never forked from the running server), whose process holds the decoder in a module
global.

Every call is one whole job (``_w_decode``): the utterance, or the start of an open utterance for
a partial, decoded in one batch.  Nothing carries from one job to the next, so any decoder can take
any session's job:

* cepstral mean normalisation is computed over the job's own audio: the decoder's ``cmn`` is
  ``batch`` (pocketsphinx 5's default) and ``process_raw(..., full_utt=True)`` keeps it there.  (The
  earlier design fed live chunks with ``full_utt=False``, which switches the decoder to live CMN for
  good; it then had to save and restore the CMN state around a second, batch pass.  Measured then
  on espeak speech through G.711: WER 0.40 with the live pass's state, 0.30 in batch.)
* ``reinit_feat()`` resets the rest of the front end (noise estimate, feature buffers) before each
  job.  Measured on 18 espeak utterances (3 voices): without it, 3 of 18 hypotheses differed from
  those of a fresh decoder, depending on what the process had decoded before; with it, none.  It
  costs 0.03 ms.

The functions prefixed ``_w_`` run inside the worker process.

A worker never outlives the server.  It would: it waits on its call queue, a pipe whose write end it
holds itself, so the server's death (SIGKILL: no shutdown of the executor) does not wake it.  So the
initializer starts a watchdog thread that checks ``os.getppid()`` every ``WATCHDOG_S``: once the
server is gone the worker has been re-parented, and it exits at once (``os._exit``: nothing of its
state is worth saving).  Not ``prctl(PR_SET_PDEATHSIG)``: that fires when the *thread* that spawned
the worker exits (here an executor thread, which may come and go), not the process.  When the
workers are gone, multiprocessing's resource tracker (started by the server for spawned processes)
reads end-of-file on its pipe, which only the server and the workers held, and exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from pipelines.stt.decode_queue import Decoded
from pipelines.stt.decoder_pool import LanguageModel

DOMAIN_LM_WEIGHT = 10.0
_FILLERS = {"<s>", "</s>", "<sil>"}

_decoder: Any = None  # the worker process's decoder
WATCHDOG_S = 0.5


def _w_watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_S)
    os._exit(0)


def _w_init(model: LanguageModel, parent: int) -> None:
    global _decoder
    # First, before the model loads (a second or so); ``parent`` from the server itself, so a server
    # that died before this line is noticed too.
    threading.Thread(target=_w_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()
    # Ctrl-C in the terminal reaches the whole process group: the server then drains its calls, and
    # their owed finals need this decoder alive.  The server ends the worker (executor shutdown, or the
    # watchdog above when the server is gone), never the terminal's SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pocketsphinx import Decoder

    if model.lm_path is None:
        _decoder = Decoder(samprate=16000, loglevel="FATAL")
    else:
        # A phrase-list LM is narrow, close to a grammar: trusting it more than the generic LM's
        # weight (6.5) helps.  On espeak speech through G.711, lw 10 took the WER from 0.30 to 0.25.
        _decoder = Decoder(samprate=16000, lm=model.lm_path, dict=model.dict_path, lw=DOMAIN_LM_WEIGHT,
                           loglevel="FATAL")


def _w_ping() -> int:
    if _decoder is None:
        raise RuntimeError("decoder did not initialise")
    return os.getpid()


def _w_decode(pcm: bytes, words: bool) -> Decoded:
    """Decode ``pcm`` as one utterance; with ``words``, also (word, start, end frame, posterior)."""
    _decoder.reinit_feat()
    _decoder.start_utt()
    _decoder.process_raw(pcm, False, True)
    _decoder.end_utt()
    hyp = _decoder.hyp()
    if hyp is None:  # no hypothesis at all (a few frames, silence): seg() would be None too
        return Decoded("")
    if not words:
        return Decoded(hyp.hypstr)
    out = []
    for seg in _decoder.seg():
        word = seg.word
        if word in _FILLERS or word.startswith(("[", "+")):
            continue
        out.append((word.split("(", 1)[0], seg.start_frame, seg.end_frame, float(seg.prob)))
    return Decoded(hyp.hypstr, tuple(out))


class DecoderProcess:
    """One decoder in one process.  ``start`` blocks (spawn + model load): call it in a thread."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.pid = 0
        self._pex = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_w_init, initargs=(model, os.getpid()),
        )

    @classmethod
    def start(cls, model: LanguageModel) -> DecoderProcess:
        proc = cls(model)
        try:
            proc.pid = proc._pex.submit(_w_ping).result(timeout=120)
        except BaseException:
            proc.close()
            raise
        return proc

    async def decode(self, pcm: bytes, words: bool) -> Decoded:
        """Raises what the worker raised, or ``BrokenProcessPool`` when the process died."""
        return await asyncio.wrap_future(self._pex.submit(_w_decode, pcm, words))

    def close(self, *, kill: bool = False) -> None:
        """Stop the process.  ``kill``: at once, even mid-job (a hung or abandoned decode); otherwise it
        exits after the job it runs, if any.  Idempotent."""
        if kill:
            # Before shutdown: until the executor joins its worker, the pid cannot name another process.
            for process in list((getattr(self._pex, "_processes", None) or {}).values()):  # a CPython detail
                with contextlib.suppress(OSError, ValueError):
                    process.kill()
        self._pex.shutdown(wait=False, cancel_futures=True)
