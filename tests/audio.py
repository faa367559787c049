"""Synthetic audio for tests: tones, their pitch, and frames shaped as aiortc hands them over."""

from __future__ import annotations

import fractions

import av
import numpy as np


def tone(hz: float, rate: int, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amp * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def stereo_frame(mono: np.ndarray, pts: int) -> av.AudioFrame:
    """What aiortc's Opus decoder hands us: 48 kHz s16 interleaved stereo, 960 samples."""
    frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate, frame.pts, frame.time_base = 48000, pts, fractions.Fraction(1, 48000)
    return frame
