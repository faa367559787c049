"""The translation interface every provider implements, for final transcripts.

Errors a translator raises (all under ``engine.errors.ProviderError``)::

    ProviderError
    └── TranslationError        the text could not be translated: unsupported pair, provider refused
        │                       (HTTP 4xx), retries exhausted, malformed answer, local process died
        └── TranslationTimeout  the caller's deadline passed (queueing, retries and the answer all
                                count against it)

Contract of ``Translator.translate(text, source_lang, target_lang, deadline_s=...)``:

* Language codes are ISO 639-1 (``"en"``, ``"es"``); ``normalise_lang`` lowercases them and drops
  a region (``"en-US"`` -> ``"en"``).
* It returns one ``Translation`` or raises; it never returns a partial or silently empty result for
  a failed request.  A missed deadline is always ``TranslationTimeout`` so the caller can report it.
* ``deadline_s`` is a relative budget in seconds from the call.  Implementations never sleep or
  wait past it.
* The answer holds exactly the text's redaction markers (``[REDACTED:phone]``), byte for byte and in
  order (``markers``), or the call raises ``TranslationError``.
* Calls may run concurrently; each implementation declares its own bound on waiting work.
* ``start()`` may pre-start resources (processes, sessions) so the first call is not slower;
  ``aclose()`` releases everything and is idempotent.  Both are usable through ``async with``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType

from engine.errors import ProviderError


class TranslationError(ProviderError):
    """A text could not be translated; the message says why and never holds a credential."""


class TranslationTimeout(TranslationError):
    """The deadline passed before a translation was available."""


@dataclass(frozen=True, slots=True)
class Translation:
    original: str
    translated: str
    source_lang: str
    target_lang: str
    provider: str
    latency_ms: float  # from the call to the result, queueing and retries included


def normalise_lang(code: str) -> str:
    """``"EN-us"`` -> ``"en"``: the primary subtag, lowercased."""
    return code.strip().replace("_", "-").split("-", 1)[0].lower()


class Translator(abc.ABC):
    name: str
    # Redaction markers (``markers``): answers that changed one and were redone between the markers, and
    # answers refused because they still did not hold the text's markers (``/api/stats``).
    marker_fallbacks: int = 0
    markers_lost: int = 0

    @abc.abstractmethod
    async def translate(self, text: str, source_lang: str, target_lang: str, *, deadline_s: float) -> Translation:
        """Translate ``text``; raise ``TranslationTimeout`` past ``deadline_s``, ``TranslationError`` otherwise."""

    @abc.abstractmethod
    def supports(self, source_lang: str, target_lang: str) -> bool:
        """Whether this translator can do the pair (codes as ``normalise_lang`` reads them)."""

    async def start(self) -> None:  # noqa: B027 - an optional hook, deliberately empty
        """Pre-start resources so the first ``translate`` does not pay for them."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release every resource; idempotent."""

    def check_pair(self, source_lang: str, target_lang: str) -> tuple[str, str]:
        """The normalised pair, or ``TranslationError`` when it is not supported."""
        src, tgt = normalise_lang(source_lang), normalise_lang(target_lang)
        if not self.supports(src, tgt):
            raise TranslationError(f"{self.name}: translation {src!r} -> {tgt!r} is not supported")
        return src, tgt

    async def __aenter__(self) -> Translator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
