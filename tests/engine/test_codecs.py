"""G.711 and L16 codecs, checked against an independent one-value-at-a-time port of g711.c.

The reference functions below transcribe the classic Sun/CCITT ``g711.c`` (the code ``audioop``
used) line by line, in plain Python, so a slip in ``engine.codecs``'s vectorised table builders
cannot hide behind the same slip here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from engine.codecs import Codec, L16Codec, PcmaCodec, PcmuCodec, get_codec
from engine.errors import CodecError

# -- reference: g711.c -----------------------------------------------------------------------------

SIGN_BIT = 0x80
QUANT_MASK = 0x0F
SEG_SHIFT = 4
SEG_MASK = 0x70
BIAS = 0x84
CLIP = 8159  # 32635 >> 2: linear2ulaw clips the 14-bit magnitude
SEG_AEND = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]
SEG_UEND = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]


def search(val: int, table: list[int]) -> int:
    for i, end in enumerate(table):
        if val <= end:
            return i
    return len(table)


def ref_ulaw2linear(u_val: int) -> int:
    u_val = ~u_val & 0xFF
    t = ((u_val & QUANT_MASK) << 3) + BIAS
    t <<= (u_val & SEG_MASK) >> SEG_SHIFT
    return (BIAS - t) if u_val & SIGN_BIT else (t - BIAS)


def ref_alaw2linear(a_val: int) -> int:
    a_val ^= 0x55
    t = (a_val & QUANT_MASK) << 4
    seg = (a_val & SEG_MASK) >> SEG_SHIFT
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t += 0x108
        t <<= seg - 1
    return t if a_val & SIGN_BIT else -t


def ref_linear2ulaw(pcm_val: int) -> int:
    pcm_val >>= 2
    if pcm_val < 0:
        pcm_val = -pcm_val
        mask = 0x7F
    else:
        mask = 0xFF
    if pcm_val > CLIP:
        pcm_val = CLIP
    pcm_val += BIAS >> 2
    seg = search(pcm_val, SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    uval = (seg << 4) | ((pcm_val >> (seg + 1)) & 0xF)
    return uval ^ mask


def ref_linear2alaw(pcm_val: int) -> int:
    pcm_val >>= 3
    if pcm_val >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        pcm_val = -pcm_val - 1
    seg = search(pcm_val, SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << SEG_SHIFT
    if seg < 2:
        aval |= (pcm_val >> 1) & QUANT_MASK
    else:
        aval |= (pcm_val >> seg) & QUANT_MASK
    return aval ^ mask


# -- helpers ---------------------------------------------------------------------------------------

ALL_CODES = bytes(range(256))
ALL_INT16 = range(-32768, 32768)


def pcm(*samples: int) -> bytes:
    return np.array(samples, dtype="<i2").tobytes()


def samples(data: bytes) -> list[int]:
    values: list[int] = np.frombuffer(data, dtype="<i2").tolist()
    return values


G711 = pytest.mark.parametrize("codec", [PcmuCodec(), PcmaCodec()], ids=["PCMU", "PCMA"])

# -- G.711 decode ----------------------------------------------------------------------------------


def test_every_mulaw_code_decodes_to_the_g711_reference_value() -> None:
    assert samples(PcmuCodec().decode(ALL_CODES)) == [ref_ulaw2linear(c) for c in range(256)]


def test_every_alaw_code_decodes_to_the_g711_reference_value() -> None:
    assert samples(PcmaCodec().decode(ALL_CODES)) == [ref_alaw2linear(c) for c in range(256)]


def test_well_known_mulaw_codes_decode_to_their_published_values() -> None:
    assert samples(PcmuCodec().decode(bytes([0xFF, 0x7F, 0x00, 0x80]))) == [0, 0, -32124, 32124]


def test_well_known_alaw_codes_decode_to_their_published_values() -> None:
    assert samples(PcmaCodec().decode(bytes([0xD5, 0x55, 0xAA, 0x2A]))) == [8, -8, 32256, -32256]


def test_decoded_pcm_is_little_endian_two_bytes_per_code() -> None:
    assert PcmuCodec().decode(b"\x00\x80") == b"\x84\x82\x7c\x7d"  # -32124, 32124 as int16 LE
    assert PcmuCodec().decode(b"") == b""


# -- G.711 encode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "reference"), [(PcmuCodec(), ref_linear2ulaw), (PcmaCodec(), ref_linear2alaw)], ids=["PCMU", "PCMA"]
)
def test_encoder_matches_the_g711_reference_for_every_int16_value(
    codec: Codec, reference: Callable[[int], int]
) -> None:
    encoded = codec.encode(np.arange(-32768, 32768, dtype="<i2").tobytes())
    assert list(encoded) == [reference(v) for v in ALL_INT16]


def test_encoder_saturates_full_scale_and_maps_silence_to_the_zero_code() -> None:
    assert PcmuCodec().encode(pcm(0, 32767, -32768)) == bytes([0xFF, 0x80, 0x00])
    assert PcmaCodec().encode(pcm(0, 32767, -32768)) == bytes([0xD5, 0xAA, 0x2A])


@G711
def test_decode_encode_decode_round_trip_is_exact_for_every_code(codec: Codec) -> None:
    decoded = codec.decode(ALL_CODES)
    assert codec.decode(codec.encode(decoded)) == decoded


@pytest.mark.parametrize("codec", [PcmuCodec(), PcmaCodec(), L16Codec(8000)], ids=["PCMU", "PCMA", "L16"])
def test_encoding_pcm_of_odd_length_raises_codec_error(codec: Codec) -> None:
    with pytest.raises(CodecError, match="odd length 3"):
        codec.encode(b"\x00\x01\x02")


# -- L16 -------------------------------------------------------------------------------------------


def test_l16_is_big_endian_on_the_wire_in_both_directions() -> None:
    codec = L16Codec(16000)
    assert codec.decode(b"\x01\x02\xff\xfe\x80\x00") == pcm(0x0102, -2, -32768)
    assert codec.encode(pcm(0x0102, -2, -32768)) == b"\x01\x02\xff\xfe\x80\x00"


def test_l16_round_trip_is_exact_for_every_int16_value() -> None:
    codec = L16Codec(8000)
    everything = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert codec.decode(codec.encode(everything)) == everything


def test_l16_payload_of_odd_length_raises_codec_error() -> None:
    with pytest.raises(CodecError, match="L16 payload of odd length 3"):
        L16Codec(16000).decode(b"\x01\x02\x03")


# -- get_codec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "rate", "cls", "frame_bytes"),
    [
        ("PCMU", 8000, PcmuCodec, 160),
        ("pcmu", 8000, PcmuCodec, 160),
        ("PcmA", 8000, PcmaCodec, 160),
        ("L16", 8000, L16Codec, 320),
        ("l16", 16000, L16Codec, 640),
    ],
)
def test_get_codec_is_case_insensitive_and_sizes_20ms_frames(
    encoding: str, rate: int, cls: type[Codec], frame_bytes: int
) -> None:
    codec = get_codec(encoding, rate)
    assert type(codec) is cls
    assert (codec.name, codec.sample_rate) == (encoding.upper(), rate)
    assert codec.frame_payload_bytes() == frame_bytes
    assert codec.frame_payload_bytes(10) == frame_bytes // 2


@pytest.mark.parametrize(
    ("encoding", "rate", "message"),
    [
        ("OPUS", 48000, "unsupported encoding 'OPUS' at 48000 Hz"),
        ("G722", 16000, "unsupported encoding 'G722' at 16000 Hz"),
        ("", 8000, "unsupported encoding '' at 8000 Hz"),
        ("PCMU", 16000, "PCMU at 16000 Hz is not supported"),
        ("pcma", 16000, "PCMA at 16000 Hz is not supported"),
        ("L16", 44100, "L16 at 44100 Hz is not supported"),
    ],
)
def test_get_codec_rejects_unsupported_formats_naming_encoding_and_rate(encoding: str, rate: int, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        get_codec(encoding, rate)


def test_get_codec_error_for_hostile_encoding_is_short_ascii() -> None:
    with pytest.raises(CodecError) as info:
        get_codec("\u00e9" * 1000, 8000)
    reason = str(info.value)
    assert reason.isascii() and len(reason) <= 120  # fits a WebSocket close reason


def test_codec_constructors_refuse_rates_the_format_does_not_run_at() -> None:
    with pytest.raises(CodecError, match="PCMU at 16000"):
        PcmuCodec(16000)
    with pytest.raises(CodecError, match="L16 at 48000"):
        L16Codec(48000)
