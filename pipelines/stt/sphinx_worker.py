"""pocketsphinx decoders in worker processes.

pocketsphinx holds the GIL inside ``Decoder()`` and ``process_raw`` (measured: a decoder thread
stalled the event loop 50 ms per 1.5 s of decoding, and 0.3 s per decoder created), so running it
in a thread keeps it off the event loop's code path but not off its time.  Each decoder therefore
lives in a process of its own: ``DecoderProcess`` wraps a one-worker ``ProcessPoolExecutor``
(spawned, never forked from the running server), whose process holds the decoder in a module
global.  Because the executor has exactly one process, every call for an utterance reaches the
same decoder state.

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
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

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
    from pocketsphinx import Decoder

    if model.lm_path is None:
        _decoder = Decoder(samprate=16000, loglevel="FATAL")
    else:
        # A phrase-list LM is narrow, close to a grammar: trusting it more than the generic LM's
        # weight (6.5) helps.  On espeak speech through G.711, lw 10 took the WER from 0.30 to 0.25.
        _decoder = Decoder(samprate=16000, lm=model.lm_path, dict=model.dict_path, lw=DOMAIN_LM_WEIGHT,
                           loglevel="FATAL")


def _w_ping() -> bool:
    return _decoder is not None


def _w_live_chunk(pcm: bytes, first: bool) -> tuple[str, str | None]:
    """Decode a chunk of the open utterance; on the first, also return the CMN state to restore."""
    cmn = None
    if first:
        cmn = _decoder.get_cmn()
        _decoder.start_utt()
    _decoder.process_raw(pcm, False, False)
    hyp = _decoder.hyp()
    return (hyp.hypstr if hyp is not None else ""), cmn


def _w_final_pass(utterance: bytes, cmn: str | None) -> tuple[str, list[tuple[str, int, int, float]]]:
    """Decode the whole utterance in one batch; returns text and (word, start, end frame, posterior)."""
    if cmn is not None:
        # The live pass adapted the front end (cepstral mean, noise estimate) to this utterance; the
        # final pass starts from the state the previous final pass left.  Measured on the test
        # sentences: WER 0.40 without the reset, 0.30 with it (as good as no live pass at all).
        _decoder.end_utt()
        _decoder.reinit_feat()
        _decoder.set_cmn(cmn)
    _decoder.start_utt()
    _decoder.process_raw(utterance, False, True)
    _decoder.end_utt()
    hyp = _decoder.hyp()
    words = []
    for seg in _decoder.seg():
        word = seg.word
        if word in _FILLERS or word.startswith(("[", "+")):
            continue
        words.append((word.split("(", 1)[0], seg.start_frame, seg.end_frame, float(seg.prob)))
    return (hyp.hypstr if hyp is not None else ""), words


class DecoderProcess:
    """One decoder in one process.  ``start`` blocks (spawn + model load): call it in a thread."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self._pex = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_w_init, initargs=(model, os.getpid()),
        )

    @classmethod
    def start(cls, model: LanguageModel) -> DecoderProcess:
        proc = cls(model)
        try:
            if not proc._pex.submit(_w_ping).result(timeout=120):
                raise RuntimeError("decoder did not initialise")
        except BaseException:
            proc.close()
            raise
        return proc

    async def live_chunk(self, pcm: bytes, first: bool) -> tuple[str, str | None]:
        return await asyncio.wrap_future(self._pex.submit(_w_live_chunk, pcm, first))

    async def final_pass(self, utterance: bytes, cmn: str | None) -> tuple[str, list[tuple[str, int, int, float]]]:
        return await asyncio.wrap_future(self._pex.submit(_w_final_pass, utterance, cmn))

    def close(self) -> None:
        """Stop the process; what it was doing is abandoned.  Idempotent."""
        self._pex.shutdown(wait=False, cancel_futures=True)
