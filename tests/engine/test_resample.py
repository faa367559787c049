"""8 kHz <-> 16 kHz resampling: frequency and level kept, aliasing removed, chunking invisible."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import CodecError
from engine.resample import Downsampler2x, Resampler, Upsampler2x


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype("<i2")


def level_db(x: np.ndarray) -> float:
    x = x[200:-200].astype(np.float64)  # skip the filter's start-up
    return float(20 * np.log10(np.sqrt(np.mean(x**2)) + 1e-9))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_upsampling_keeps_frequency_and_level(freq: float) -> None:
    x = tone(freq, 8000)
    y = np.frombuffer(Upsampler2x().process(x.tobytes()), dtype="<i2")
    assert len(y) == 2 * len(x)
    assert abs(peak_hz(y, 16000) - freq) <= 2
    assert abs(level_db(y) - level_db(x)) < 1.0


def test_upsampling_suppresses_the_image_above_4khz() -> None:
    y = np.frombuffer(Upsampler2x().process(tone(1000, 8000).tobytes()), dtype="<i2").astype(np.float64)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    image = spec[int(7000 * len(y) / 16000)]  # the 8000-1000 Hz image
    assert 20 * np.log10(spec.max() / image) > 50


def test_downsampling_removes_content_above_4khz() -> None:
    passed = np.frombuffer(Downsampler2x().process(tone(1000, 16000).tobytes()), dtype="<i2")
    aliased = np.frombuffer(Downsampler2x().process(tone(6000, 16000).tobytes()), dtype="<i2")
    assert len(passed) == 8000
    assert abs(peak_hz(passed, 8000) - 1000) <= 2
    assert level_db(passed) - level_db(aliased) >= 30


@pytest.mark.parametrize("cls", [Upsampler2x, Downsampler2x])
def test_chunked_processing_equals_whole(cls) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    x = rng.integers(-20000, 20000, 8000 + 3).astype("<i2")
    whole = cls().process(x.tobytes())
    r = cls()
    sizes = [160, 320, 1, 7, 161]
    parts, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        parts.append(r.process(x[i : i + n].tobytes()))
        i, k = i + n, k + 1
    assert b"".join(parts) == whole


def test_resampler_picks_direction_and_rejects_other_ratios() -> None:
    assert Resampler(8000, 8000).identity
    pcm = tone(500, 8000, 0.02).tobytes()
    assert Resampler(8000, 8000).process(pcm) == pcm
    assert len(Resampler(8000, 16000).process(pcm)) == 2 * len(pcm)
    assert len(Resampler(16000, 8000).process(pcm)) == len(pcm) // 2
    with pytest.raises(CodecError):
        Resampler(8000, 44100)


def test_full_scale_input_saturates_instead_of_wrapping() -> None:
    square = np.tile(np.array([32767] * 8 + [-32768] * 8, dtype="<i2"), 100)
    y = np.frombuffer(Upsampler2x().process(square.tobytes()), dtype="<i2")
    assert y.max() == 32767 and y.min() == -32768  # Gibbs overshoot clipped, not wrapped
