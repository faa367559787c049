"""8 kHz <-> 16 kHz resampling: frequency and level kept, images and aliases removed, chunking
invisible, lengths and delay as documented."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import CodecError
from engine.resample import Downsampler2x, Resampler, Upsampler2x

SKIP = 400  # samples at each end left out of level measurements: filter start-up and tail


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amp * np.sin(2 * np.pi * freq * t)).astype("<i2")


def run(resampler: Upsampler2x | Downsampler2x | Resampler, x: np.ndarray) -> np.ndarray:
    return np.frombuffer(resampler.process(x.tobytes()), dtype="<i2")


def level_db(x: np.ndarray) -> float:
    x = x[SKIP:-SKIP].astype(np.float64)
    return float(10 * np.log10(np.mean(x**2) + 1e-12))


def spectrum(x: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))


def peak_hz(x: np.ndarray, rate: int) -> float:
    return float(np.argmax(spectrum(x)) * rate / len(x))


def feed_in_chunks(resampler: Upsampler2x | Downsampler2x, x: np.ndarray, sizes: list[int]) -> bytes:
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(resampler.process(x[i : i + n].tobytes()))
        i, k = i + n, k + 1
    return b"".join(out)


# -- frequency response ----------------------------------------------------------------------------


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 3400.0])
def test_upsampled_tone_keeps_its_frequency_and_its_level_within_1db(freq: float) -> None:
    x = tone(freq, 8000)
    y = run(Upsampler2x(), x)
    assert abs(peak_hz(y, 16000) - freq) <= 1
    assert abs(level_db(y) - level_db(x)) < 1.0


def test_upsampling_suppresses_the_image_of_a_1khz_tone_by_60db() -> None:
    s = spectrum(run(Upsampler2x(), tone(1000, 8000)))  # 1 Hz bins
    assert 20 * np.log10(s[1000] / s[7000]) > 60  # 7 kHz = 8 kHz - 1 kHz, the zero-stuffing image


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 3400.0])
def test_downsampled_tone_below_4khz_keeps_its_frequency_and_its_level_within_1db(freq: float) -> None:
    x = tone(freq, 16000)
    y = run(Downsampler2x(), x)
    assert abs(peak_hz(y, 8000) - freq) <= 1
    assert abs(level_db(y) - level_db(x)) < 1.0


@pytest.mark.parametrize("freq", [4600.0, 6000.0, 7500.0])
def test_downsampling_attenuates_tones_above_4khz_by_at_least_60db_instead_of_aliasing(freq: float) -> None:
    x = tone(freq, 16000)
    y = run(Downsampler2x(), x)
    assert level_db(x) - level_db(y) >= 60  # >= 30 dB is the requirement; the filter gives ~70+


@pytest.mark.parametrize("cls", [Upsampler2x, Downsampler2x])
def test_full_scale_overshoot_saturates_instead_of_wrapping(cls: type[Upsampler2x | Downsampler2x]) -> None:
    # The filter is linear: full scale must give twice the half-scale output, clipped to the rails.
    # A wrapped sample would be ~65536 away from that.
    square = np.tile(np.array([32767] * 8 + [-32768] * 8, dtype="<i2"), 100)
    full = run(cls(), square).astype(np.int32)
    half = run(cls(), square // 2).astype(np.int32)
    assert full.max() == 32767 and full.min() == -32768  # the Gibbs overshoot did reach the rails
    assert np.abs(full - np.clip(2 * half, -32768, 32767)).max() <= 4  # rounding twice, 1 LSB input gap


# -- streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "frame"), [(Upsampler2x, 160), (Downsampler2x, 320)])
def test_20ms_chunks_give_exactly_the_bytes_of_the_whole_signal(
    cls: type[Upsampler2x | Downsampler2x], frame: int
) -> None:
    x = np.random.default_rng(3).integers(-32768, 32768, 50 * frame).astype("<i2")
    assert feed_in_chunks(cls(), x, [frame]) == cls().process(x.tobytes())


@pytest.mark.parametrize("cls", [Upsampler2x, Downsampler2x])
def test_irregular_and_odd_sized_chunks_give_exactly_the_bytes_of_the_whole_signal(
    cls: type[Upsampler2x | Downsampler2x],
) -> None:
    x = np.random.default_rng(4).integers(-20000, 20000, 8003).astype("<i2")
    assert feed_in_chunks(cls(), x, [160, 1, 7, 0, 320, 161, 33]) == cls().process(x.tobytes())


def test_upsampler_returns_twice_the_samples_of_every_chunk() -> None:
    up = Upsampler2x()
    for n in (160, 1, 0, 7):
        assert len(up.process(bytes(2 * n))) == 2 * (2 * n)


def test_downsampler_returns_half_the_samples_carrying_an_odd_one_to_the_next_call() -> None:
    down = Downsampler2x()
    got = [len(down.process(bytes(2 * n))) // 2 for n in (320, 3, 3, 1, 0, 1)]
    assert got == [160, 1, 2, 0, 0, 1]


def test_delay_is_2ms_in_both_directions() -> None:
    impulse8, impulse16 = np.zeros(400, dtype="<i2"), np.zeros(800, dtype="<i2")
    impulse8[0] = impulse16[0] = 16000
    assert np.argmax(run(Upsampler2x(), impulse8)) == 32  # 32 samples at 16 kHz
    assert np.argmax(run(Downsampler2x(), impulse16)) == 16  # 16 samples at 8 kHz


@pytest.mark.parametrize(("cls", "frame"), [(Upsampler2x, 160), (Downsampler2x, 321)])
def test_reset_forgets_history_and_carried_sample(cls: type[Upsampler2x | Downsampler2x], frame: int) -> None:
    x = tone(1000, 8000, 0.1)
    used = cls()
    used.process(x[:frame].tobytes())
    used.reset()
    assert used.process(x.tobytes()) == cls().process(x.tobytes())


@pytest.mark.parametrize("cls", [Upsampler2x, Downsampler2x])
def test_pcm_of_odd_byte_length_raises_codec_error(cls: type[Upsampler2x | Downsampler2x]) -> None:
    with pytest.raises(CodecError, match="odd length"):
        cls().process(b"\x00\x01\x02")


# -- Resampler -------------------------------------------------------------------------------------


def test_resampler_passes_equal_rates_through_untouched() -> None:
    pcm = tone(500, 8000, 0.02).tobytes()
    for rate in (8000, 16000):
        r = Resampler(rate, rate)
        assert r.identity and r.process(pcm) is pcm


def test_resampler_picks_the_direction_from_the_rates() -> None:
    x = tone(1000, 8000, 0.5)
    up, down = Resampler(8000, 16000), Resampler(16000, 8000)
    assert not up.identity and not down.identity
    assert run(up, x).tobytes() == Upsampler2x().process(x.tobytes())
    assert run(down, x).tobytes() == Downsampler2x().process(x.tobytes())


@pytest.mark.parametrize(("src", "dst"), [(8000, 44100), (16000, 48000), (8000, 24000), (48000, 24000)])
def test_resampler_rejects_other_rate_pairs_naming_them(src: int, dst: int) -> None:
    with pytest.raises(CodecError, match=f"{src} Hz to {dst} Hz"):
        Resampler(src, dst)
