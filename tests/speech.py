"""Real speech fixtures: espeak-ng sentences at telephone rates, cached, and word error rate.

espeak-ng writes 22,050 Hz WAV; it is resampled by band-limited FFT resampling of the whole
utterance (exact for a finite signal, no extra tool needed).  Results are cached by their arguments
under ``tests/.speech-cache`` so the suite synthesizes each sentence once.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile

CACHE = Path(__file__).parent / ".speech-cache"


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x
    n_out = int(round(len(x) * dst / src))
    spectrum = np.fft.rfft(x)[: n_out // 2 + 1]
    return np.fft.irfft(spectrum, n_out) * (n_out / len(x))


def synthesize(text: str, *, rate: int = 8000, voice: str = "en-us", wpm: int = 150, pad_ms: int = 300) -> np.ndarray:
    """``text`` spoken by espeak-ng as int16 samples at ``rate``, with ``pad_ms`` of silence each side."""
    key = hashlib.sha256(f"{text}|{rate}|{voice}|{wpm}|{pad_ms}".encode()).hexdigest()[:24]
    cached = CACHE / f"{key}.npy"
    if cached.exists():
        return np.load(cached)  # type: ignore[no-any-return]
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (make test installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav), text], check=True,
                       capture_output=True)
        data, src_rate = soundfile.read(wav, dtype="float64")
    y = resample(data, src_rate, rate)
    pad = np.zeros(rate * pad_ms // 1000)
    out = np.clip(np.rint(np.concatenate((pad, y, pad)) * 32767), -32768, 32767).astype(np.int16)
    CACHE.mkdir(exist_ok=True)
    tmp_path = cached.with_suffix(".tmp.npy")
    np.save(tmp_path, out)
    tmp_path.replace(cached)  # atomic: parallel test processes never read half a file
    return out


def utterances_with_pauses(texts: list[str], *, pause_ms: int = 800, rate: int = 8000) -> np.ndarray:
    """The sentences one after another, separated (and surrounded) by ``pause_ms`` of silence."""
    gap = np.zeros(rate * pause_ms // 1000, dtype=np.int16)
    parts = [gap]
    for text in texts:
        parts += [synthesize(text, rate=rate, pad_ms=0), gap]
    return np.concatenate(parts)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by word-level Levenshtein."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
