"""A bounded pool of pocketsphinx decoders, and the domain language models they load.

A decoder with the bundled English LM holds about 90 MB; one with a domain LM about 40 MB.  A
burst of calls must not create one per call, so decoders are pooled per language model:

* at most ``max_decoders`` exist per model, created lazily in the executor;
* a session holds one for a single utterance (``acquire`` ... ``release``), so N decoders serve
  many more calls than N, with utterances queueing for a free one;
* ``acquire`` waits at most ``acquire_timeout`` seconds, then raises ``ProviderUnavailable``;
* a decoder whose state is uncertain (its owner was cancelled mid-call) is ``discard``ed, not
  reused: the pool forgets it and may create a fresh one.

Domain models are built from a phrase list with ``pocketsphinx.lm`` (an ARPA trigram LM) plus a
dictionary cut down to the phrases' words, cached on disk by a hash of the normalised phrases.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ProviderUnavailable

log = logging.getLogger("switchboard.stt.pocketsphinx")


@dataclass(frozen=True, slots=True)
class LanguageModel:
    key: str  # "default" or a hash of the phrases
    lm_path: str | None = None  # None: the bundled English LM and dictionary
    dict_path: str | None = None


DEFAULT_MODEL = LanguageModel("default")


def normalise_phrases(phrases: Sequence[str]) -> list[str]:
    out = []
    for phrase in phrases:
        words = re.sub(r"[^a-z' ]+", " ", phrase.lower()).split()
        if words:
            out.append(" ".join(words))
    return out


def model_key(phrases: Sequence[str]) -> str:
    norm = normalise_phrases(phrases)
    if not norm:
        return DEFAULT_MODEL.key
    return hashlib.sha256("\n".join(sorted(set(norm))).encode()).hexdigest()[:20]


def build_domain_model(phrases: Sequence[str], cache_dir: Path) -> LanguageModel:
    """Build (or reuse from ``cache_dir``) the LM and dictionary for ``phrases``.  Blocking: run in
    an executor.  Words missing from the pronouncing dictionary are dropped with a warning."""
    import pocketsphinx
    from pocketsphinx.lm import ArpaBoLM

    key = model_key(phrases)
    if key == DEFAULT_MODEL.key:
        return DEFAULT_MODEL
    lm_path, dict_path = cache_dir / f"{key}.lm", cache_dir / f"{key}.dict"
    if lm_path.exists() and dict_path.exists():
        return LanguageModel(key, str(lm_path), str(dict_path))
    cache_dir.mkdir(parents=True, exist_ok=True)
    full_dict = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    norm = normalise_phrases(phrases)
    vocabulary = {w for p in norm for w in p.split()}
    entries, known = [], set()
    with open(full_dict, encoding="utf-8") as f:
        for line in f:
            word = line.split(" ", 1)[0]
            base = word.split("(", 1)[0]
            if base in vocabulary:
                entries.append(line)
                known.add(base)
    missing = sorted(vocabulary - known)
    if missing:
        log.warning("stt.phrases_unknown_words", extra={"count": len(missing), "words": missing[:20]})
    kept = [" ".join(w for w in p.split() if w in known) for p in norm]
    kept = [p for p in kept if p]
    if not kept:
        return DEFAULT_MODEL
    builder = ArpaBoLM(text="\n".join(kept) + "\n", add_start=True, case="lower")
    builder.compute()
    out = io.StringIO()
    builder.write(out)
    # Write to temporary names, then rename: concurrent builders never see half a file.
    for path, text in ((dict_path, "".join(entries)), (lm_path, out.getvalue())):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return LanguageModel(key, str(lm_path), str(dict_path))


class DecoderPool:
    """Decoders for one language model.  ``factory`` is blocking and runs in the executor."""

    def __init__(
        self,
        model: LanguageModel,
        factory: Callable[[LanguageModel], object],
        *,
        max_decoders: int,
        acquire_timeout: float,
        run: Callable[..., asyncio.Future[object]],
    ) -> None:
        self.model = model
        self.max_decoders = max_decoders
        self.created = 0
        self.in_use = 0
        self._factory = factory
        self._timeout = acquire_timeout
        self._run = run
        self._idle: list[object] = []
        self._cond = asyncio.Condition()

    async def acquire(self) -> object:
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: bool(self._idle) or self.created < self.max_decoders),
                    self._timeout,
                )
            except TimeoutError:
                raise ProviderUnavailable(
                    f"no free pocketsphinx decoder within {self._timeout:g}s ({self.max_decoders} in use)"
                ) from None
            self.in_use += 1
            if self._idle:
                return self._idle.pop()
            self.created += 1
        try:
            return await self._run(self._factory, self.model)
        except BaseException:
            async with self._cond:
                self.created -= 1
                self.in_use -= 1
                self._cond.notify()
            raise

    async def release(self, decoder: object) -> None:
        async with self._cond:
            self.in_use -= 1
            self._idle.append(decoder)
            self._cond.notify()

    async def discard(self, decoder: object) -> None:
        _close(decoder)
        async with self._cond:
            self.in_use -= 1
            self.created -= 1
            self._cond.notify()

    def close(self) -> None:
        """Close the idle decoders (decoders in use are closed by their sessions' ``discard``)."""
        for decoder in self._idle:
            _close(decoder)
        self._idle.clear()


def _close(decoder: object) -> None:
    close = getattr(decoder, "close", None)
    if close is not None:
        close()
