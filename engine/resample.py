"""Streaming 2x resampling between 8 kHz and 16 kHz for int16 mono PCM.

One low-pass FIR does both jobs: interpolation after zero-stuffing (8 -> 16 kHz, gain 2) and
anti-aliasing before decimation (16 -> 8 kHz).  It is a 65-tap Kaiser-windowed sinc at the 16 kHz
rate, cut off at 3.8 kHz: within 0.2 dB of flat through the telephone band (300-3400 Hz), -6 dB at
3.8 kHz, at least 70 dB down from 4.4 kHz up.  Both directions run it polyphase, as two 33-tap
branches at the 8 kHz rate, so no multiply is spent on a stuffed zero or a discarded output.

Streaming.  Each resampler keeps the input its next outputs still need (32 samples at 8 kHz, 64 at
16 kHz, plus an odd sample waiting for its pair), so feeding a signal in chunks of any size gives
exactly the bytes of feeding it whole.  Exactly, not nearly: the taps are rounded to multiples of
2**-20, so every product and partial sum of int16 samples is a float64 without rounding error, and
no summation order (BLAS kernel, chunk alignment) can change a result.

Delay.  Output lags input by 32 samples at 16 kHz (2 ms) in both directions; the first 2 ms come
out of zeroed history.  ``reset()`` before audio that does not continue the previous chunk.
"""

from __future__ import annotations

import numpy as np

from engine.errors import CodecError

TAPS = 65
CUTOFF_HZ = 3800
_KAISER_BETA = 7.0  # the stopband (>= 70 dB) and passband (<= 0.2 dB droop) balance at 65 taps
_M = (TAPS - 1) // 2  # taps per polyphase branch, less one; also the delay in 16 kHz samples
_QUANTUM = 2.0**-20  # tap resolution that keeps the float arithmetic exact (module docstring)


def _lowpass() -> np.ndarray:
    n = np.arange(TAPS) - _M
    fc = CUTOFF_HZ / 16000  # cycles per sample at the high rate
    h = 2 * fc * np.sinc(2 * fc * n) * np.kaiser(TAPS, _KAISER_BETA)
    h /= h.sum()  # unity gain at DC
    quantized: np.ndarray = np.rint(h / _QUANTUM) * _QUANTUM
    return quantized


_H = _lowpass()
# Branches as np.correlate kernels (reversed), each M + 1 long; the odd branch has only M taps and
# is padded with a zero on the side that lines its outputs up with the even branch's.
_UP_EVEN = (2 * _H[0::2])[::-1].copy()  # gain 2 puts back the energy of the stuffed zeros
_UP_ODD = np.concatenate(([0.0], (2 * _H[1::2])[::-1]))
_DOWN_EVEN = _H[0::2][::-1].copy()
_DOWN_ODD = np.concatenate((_H[1::2][::-1], [0.0]))


def _samples(pcm: bytes) -> np.ndarray:
    if len(pcm) & 1:
        raise CodecError(f"PCM of odd length {len(pcm)} is not whole int16 samples")
    return np.frombuffer(pcm, dtype="<i2")


def _to_pcm(y: np.ndarray) -> bytes:
    """Round and saturate in place (filter overshoot must clip, not wrap), then int16 LE bytes."""
    np.rint(y, out=y)
    # np.minimum/np.maximum rather than np.clip: same result, a third of the per-call overhead.
    np.minimum(y, 32767.0, out=y)
    np.maximum(y, -32768.0, out=y)
    return y.astype("<i2").tobytes()


class Upsampler2x:
    """8 kHz -> 16 kHz.  ``process`` returns exactly twice as many samples as it is given."""

    def __init__(self) -> None:
        self._hist = np.zeros(_M)  # the last M input samples

    def reset(self) -> None:
        """Forget the history: the next chunk starts as if preceded by silence."""
        self._hist = np.zeros(_M)

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk of int16 LE PCM; ``CodecError`` if ``pcm`` has an odd length."""
        x = _samples(pcm)
        if not len(x):
            return b""
        buf = np.concatenate((self._hist, x))
        self._hist = buf[-_M:].copy()  # a copy, so a long chunk is not kept alive by its tail
        y = np.empty(2 * len(x))
        y[0::2] = np.correlate(buf, _UP_EVEN, "valid")
        y[1::2] = np.correlate(buf, _UP_ODD, "valid")
        return _to_pcm(y)


class Downsampler2x:
    """16 kHz -> 8 kHz.  ``process`` returns half the samples it is given, counting a sample left
    over from the previous call; an odd sample out waits for the next call."""

    def __init__(self) -> None:
        self._hist = np.zeros(2 * _M)  # the last 2M consumed input samples, then any unpaired one

    def reset(self) -> None:
        """Forget the history and any unpaired sample."""
        self._hist = np.zeros(2 * _M)

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk of int16 LE PCM; ``CodecError`` if ``pcm`` has an odd length."""
        buf = np.concatenate((self._hist, _samples(pcm)))
        n = (len(buf) - 2 * _M) // 2  # outputs ready: one per pair of new samples
        self._hist = buf[2 * n :].copy()
        if not n:
            return b""
        end = 2 * (n + _M)
        y = np.correlate(buf[0:end:2], _DOWN_EVEN, "valid")
        y += np.correlate(buf[1:end:2], _DOWN_ODD, "valid")
        return _to_pcm(y)


class Resampler:
    """Converts int16 LE PCM from ``src_rate`` to ``dst_rate``: 8000 <-> 16000 Hz, or equal rates.

    ``identity`` is true when the rates are equal; ``process`` then returns its argument unchanged
    (callers may skip it).  Other rates raise ``CodecError``.  Stateful like the resamplers it
    wraps: one per stream, and ``reset()`` between discontinuous pieces of audio.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._impl: Upsampler2x | Downsampler2x | None
        if (src_rate, dst_rate) == (8000, 16000):
            self._impl = Upsampler2x()
        elif (src_rate, dst_rate) == (16000, 8000):
            self._impl = Downsampler2x()
        elif src_rate == dst_rate:
            self._impl = None
        else:
            raise CodecError(f"cannot resample {src_rate} Hz to {dst_rate} Hz: only between 8000 and 16000 Hz")
        self.identity = self._impl is None

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk; see ``Upsampler2x.process`` and ``Downsampler2x.process``."""
        return pcm if self._impl is None else self._impl.process(pcm)

    def reset(self) -> None:
        """Forget filter history; a no-op for the identity."""
        if self._impl is not None:
            self._impl.reset()

    def __repr__(self) -> str:
        return f"Resampler({self.src_rate}, {self.dst_rate})"
