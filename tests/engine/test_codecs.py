"""G.711 and L16 codecs against an independent, one-code-at-a-time reference (classic g711.c)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.codecs import L16Codec, PcmaCodec, PcmuCodec, get_codec
from engine.errors import CodecError


def ref_ulaw2linear(u: int) -> int:
    u = ~u & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return (0x84 - t) if u & 0x80 else (t - 0x84)


def ref_alaw2linear(a: int) -> int:
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t += 0x108
        t <<= seg - 1
    return t if a & 0x80 else -t


def _search(val: int, table: list[int]) -> int:
    for i, end in enumerate(table):
        if val <= end:
            return i
    return len(table)


def ref_linear2ulaw(pcm: int) -> int:
    pcm >>= 2
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    else:
        mask = 0xFF
    pcm = min(pcm, 8159) + 0x21
    seg = _search(pcm, [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm >> (seg + 1)) & 0xF)) ^ mask


def ref_linear2alaw(pcm: int) -> int:
    pcm >>= 3
    if pcm >= 0:
        mask = 0xD5
    else:
        mask, pcm = 0x55, -pcm - 1
    seg = _search(pcm, [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    aval |= ((pcm >> 1) if seg < 2 else (pcm >> seg)) & 0xF
    return aval ^ mask


CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32)


def test_all_256_mulaw_codes_decode_to_the_g711_table() -> None:
    got = np.frombuffer(PcmuCodec().decode(CODES), dtype="<i2").tolist()
    assert got == [ref_ulaw2linear(c) for c in range(256)]


def test_all_256_alaw_codes_decode_to_the_g711_table() -> None:
    got = np.frombuffer(PcmaCodec().decode(CODES), dtype="<i2").tolist()
    assert got == [ref_alaw2linear(c) for c in range(256)]


def test_well_known_code_values() -> None:
    mu = np.frombuffer(PcmuCodec().decode(bytes([0xFF, 0x7F, 0x00, 0x80])), dtype="<i2").tolist()
    assert mu == [0, 0, -32124, 32124]
    a = np.frombuffer(PcmaCodec().decode(bytes([0xD5, 0x55, 0xAA, 0x2A])), dtype="<i2").tolist()
    assert a == [8, -8, 32256, -32256]


@pytest.mark.parametrize(("codec", "ref"), [(PcmuCodec(), ref_linear2ulaw), (PcmaCodec(), ref_linear2alaw)],
                         ids=["PCMU", "PCMA"])
def test_encoder_matches_the_reference_for_every_int16_value(codec, ref) -> None:  # type: ignore[no-untyped-def]
    got = codec.encode(ALL_SAMPLES.astype("<i2").tobytes())
    assert list(got) == [ref(int(v)) for v in ALL_SAMPLES]


@pytest.mark.parametrize("codec", [PcmuCodec(), PcmaCodec()], ids=["PCMU", "PCMA"])
def test_decode_encode_round_trip_is_exact_for_every_code(codec) -> None:  # type: ignore[no-untyped-def]
    pcm = codec.decode(CODES)
    assert codec.decode(codec.encode(pcm)) == pcm


def test_l16_is_big_endian_on_the_wire() -> None:
    codec = L16Codec(16000)
    assert codec.decode(b"\x01\x02\xff\xfe") == np.array([0x0102, -2], dtype="<i2").tobytes()
    assert codec.encode(np.array([0x0102, -2], dtype="<i2").tobytes()) == b"\x01\x02\xff\xfe"
    with pytest.raises(CodecError, match="odd"):
        codec.decode(b"\x01\x02\x03")


def test_frame_sizes() -> None:
    assert get_codec("pcmu", 8000).frame_payload_bytes() == 160
    assert get_codec("PCMA", 8000).frame_payload_bytes(20) == 160
    assert get_codec("L16", 8000).frame_payload_bytes() == 320
    assert get_codec("L16", 16000).frame_payload_bytes() == 640


@pytest.mark.parametrize(("encoding", "rate", "message"), [
    ("OPUS", 48000, "unsupported encoding"), ("G722", 16000, "unsupported encoding"),
    ("PCMU", 16000, "PCMU at 16000"), ("L16", 44100, "L16 at 44100"),
])
def test_unsupported_formats_raise_codec_error_naming_them(encoding: str, rate: int, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        get_codec(encoding, rate)
