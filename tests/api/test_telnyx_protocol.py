"""The Telnyx stream protocol state machine, fed message by message (no sockets)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from api.telnyx_protocol import (
    AUTH_FIELD,
    MAX_HELD_MESSAGES,
    MAX_TOKEN_CHARS,
    Connected,
    Dtmf,
    MarkPlayed,
    Media,
    Started,
    Stopped,
    StreamFailed,
    StreamState,
    TelnyxStreamProtocol,
)
from engine.codecs import get_codec
from engine.errors import InvalidPayload, MessageTooBig, PolicyViolation, ProtocolError, UnsupportedData
from engine.frames import Track


def msg(**fields: object) -> str:
    return orjson.dumps(fields).decode()


def start(seq: int = 1, encoding: str = "PCMU", rate: int = 8000, channels: int = 1) -> str:
    return msg(event="start", sequence_number=str(seq), stream_id="s-1", start={
        "call_control_id": "v3:call-1", "call_session_id": "sess", "from": "+1", "to": "+2",
        "media_format": {"encoding": encoding, "sample_rate": rate, "channels": channels}})


def media(seq: int, payload: bytes, track: str = "inbound") -> str:
    return msg(event="media", sequence_number=str(seq), stream_id="s-1",
               media={"track": track, "chunk": str(seq - 1), "timestamp": "0",
                      "payload": base64.b64encode(payload).decode()})


def tone_frame(encoding: str = "PCMU", rate: int = 8000, value: int = 1000) -> bytes:
    pcm = np.full(rate // 50, value, dtype="<i2").tobytes()
    return get_codec(encoding, rate).encode(pcm)


def streaming(**kwargs: object) -> TelnyxStreamProtocol:
    p = TelnyxStreamProtocol(**kwargs)  # type: ignore[arg-type]
    p.receive_text(msg(event="connected", version="1.0.0"))
    p.receive_text(start())
    return p


def test_connected_then_start_reports_media_format_and_call_id() -> None:
    p = TelnyxStreamProtocol()
    assert p.receive_text(msg(event="connected", version="1.0.0")) == [Connected("1.0.0")]
    (ev,) = p.receive_text(start(encoding="PCMA"))
    assert isinstance(ev, Started)
    assert (ev.stream_id, ev.call_control_id, ev.encoding, ev.sample_rate) == ("s-1", "v3:call-1", "PCMA", 8000)
    assert p.state is StreamState.STREAMING


@pytest.mark.parametrize(("encoding", "rate"), [("PCMU", 8000), ("PCMA", 8000), ("L16", 8000), ("L16", 16000)])
def test_media_is_decoded_by_the_start_encoding(encoding: str, rate: int) -> None:
    p = TelnyxStreamProtocol()
    p.receive_text(start(encoding=encoding, rate=rate))
    (ev,) = p.receive_text(media(2, tone_frame(encoding, rate, 1000)))
    assert isinstance(ev, Media)
    samples = np.frombuffer(ev.pcm, dtype="<i2")
    assert len(samples) == rate // 50
    assert abs(int(samples.mean()) - 1000) < 40  # G.711 quantisation step near 1000 is 32


def test_media_timestamps_count_samples_per_track() -> None:
    p = streaming()
    frame = tone_frame()
    evs = [p.receive_text(media(i, frame, "inbound" if i % 2 else "outbound"))[0] for i in range(2, 8)]
    by_track: dict[Track, list[int]] = {}
    for ev in evs:
        assert isinstance(ev, Media)
        by_track.setdefault(ev.track, []).append(ev.timestamp_ms)
    assert by_track == {Track.OUTBOUND: [0, 20, 40], Track.INBOUND: [0, 20, 40]}


def test_out_of_order_frames_are_reordered_within_the_window() -> None:
    p = streaming(reorder_window=4)
    frame = tone_frame()
    out = []
    for seq in (2, 4, 3, 6, 5, 7):
        out += [ev.sequence for ev in p.receive_text(media(seq, frame)) if isinstance(ev, Media)]
    assert out == [2, 3, 4, 5, 6, 7]
    assert p.stats.lost == 0 and p.stats.late == 0


def test_a_gap_larger_than_the_window_is_declared_lost_and_late_frames_dropped() -> None:
    p = streaming(reorder_window=2)
    frame = tone_frame()
    out = []
    for seq in (2, 4, 5, 6, 3):  # 3 is missing until after the window gave up on it
        out += [ev.sequence for ev in p.receive_text(media(seq, frame)) if isinstance(ev, Media)]
    assert out == [2, 4, 5, 6]
    assert p.stats.lost == 1 and p.stats.late == 1


def test_stop_flushes_held_frames_in_order() -> None:
    p = streaming(reorder_window=8)
    frame = tone_frame()
    assert p.receive_text(media(3, frame)) == []
    evs = p.receive_text(msg(event="stop", sequence_number="9", stream_id="s-1", stop={}))
    assert [type(e) for e in evs] == [Media, Stopped]
    assert p.stats.lost == 1  # seq 2 never came


def test_dtmf_mark_and_error_events() -> None:
    p = streaming()
    assert p.receive_text(msg(event="dtmf", sequence_number="2", dtmf={"digit": "5"})) == [Dtmf("5", 2)]
    p.mark("greeting")
    assert p.receive_text(msg(event="mark", sequence_number="3", mark={"name": "greeting"})) == [
        MarkPlayed("greeting")]
    assert not p.pending_marks
    (err,) = p.receive_text(msg(event="error", payload={"code": 100002, "title": "x", "detail": "bad"}))
    assert err == StreamFailed("100002", "bad")


def test_outbound_media_mark_and_clear_messages() -> None:
    p = streaming()
    pcm = np.zeros(160, dtype="<i2").tobytes()
    sent = orjson.loads(p.media(pcm))
    assert sent["event"] == "media"
    assert base64.b64decode(sent["media"]["payload"]) == get_codec("PCMU", 8000).encode(pcm)
    assert orjson.loads(p.mark("m1")) == {"event": "mark", "mark": {"name": "m1"}}
    assert orjson.loads(p.clear()) == {"event": "clear"}


def test_header_authenticated_stream_needs_no_connected_and_no_look_up() -> None:
    p = TelnyxStreamProtocol(authenticated=True)
    assert p.receive_text(start())  # the transport resolved the header token: start alone is enough


def test_connected_field_token_is_handed_over_and_what_follows_held_until_authenticated() -> None:
    p = TelnyxStreamProtocol(authenticated=False)
    (ev,) = p.receive_text(msg(event="connected", version="1.0.0", **{AUTH_FIELD: "sbm_x"}))
    assert ev == Connected("1.0.0", "sbm_x") and "sbm_x" not in repr(ev)
    assert p.receive_text(start()) == []  # held while the transport looks the token up
    assert p.receive_text(media(2, tone_frame())) == []
    events = p.authenticated(True)
    assert [type(e) for e in events] == [Started, Media] and p.state is StreamState.STREAMING
    assert len(p.receive_text(media(3, tone_frame()))) == 1  # from now on, as usual


def test_unknown_field_token_is_a_policy_violation_and_releases_nothing() -> None:
    p = TelnyxStreamProtocol(authenticated=False)
    p.receive_text(msg(event="connected", version="1.0.0", **{AUTH_FIELD: "sbm_wrong"}))
    p.receive_text(start())
    with pytest.raises(PolicyViolation, match="token"):
        p.authenticated(False)
    assert p.started is None


@pytest.mark.parametrize("field", [None, "", 7, "x" * (MAX_TOKEN_CHARS + 1)])
def test_missing_or_malformed_field_token_is_a_policy_violation(field: object) -> None:
    p = TelnyxStreamProtocol(authenticated=False)
    connected: dict[str, object] = {"event": "connected", "version": "1.0.0"}
    if field is not None:
        connected[AUTH_FIELD] = field
    with pytest.raises(PolicyViolation, match="token"):
        p.receive_text(orjson.dumps(connected).decode())


def test_start_before_an_accepted_token_is_a_policy_violation() -> None:
    with pytest.raises(PolicyViolation, match="token"):
        TelnyxStreamProtocol(authenticated=False).receive_text(start())


def test_messages_held_while_verifying_are_bounded() -> None:
    p = TelnyxStreamProtocol(authenticated=False)
    p.receive_text(msg(event="connected", version="1.0.0", **{AUTH_FIELD: "sbm_x"}))
    for _ in range(MAX_HELD_MESSAGES):
        p.receive_text(media(1, tone_frame()))
    with pytest.raises(PolicyViolation, match="while the stream auth token was checked"):
        p.receive_text(media(1, tone_frame()))


BAD_INPUT = [
    ("malformed json", lambda p: p.receive_text('{"event": "media", '), InvalidPayload, 1007),
    ("not an object", lambda p: p.receive_text("[1, 2]"), InvalidPayload, 1007),
    ("unknown event", lambda p: p.receive_text(msg(event="transfer")), UnsupportedData, 1003),
    ("binary frame", lambda p: p.receive_binary(b"\x00\x01"), UnsupportedData, 1003),
    ("bad base64", lambda p: p.receive_text(msg(event="media", sequence_number="2",
                                                media={"payload": "!!notbase64!!"})), InvalidPayload, 1007),
    ("partial frame", lambda p: p.receive_text(media(2, b"\xff" * 100)), InvalidPayload, 1007),
    ("empty payload", lambda p: p.receive_text(media(2, b"")), InvalidPayload, 1007),
    ("bad sequence", lambda p: p.receive_text(msg(event="media", sequence_number="x", media={"payload": ""})),
     InvalidPayload, 1007),
    ("second start", lambda p: p.receive_text(start()), PolicyViolation, 1008),
    ("oversized", lambda p: p.receive_text("x" * 70_000), MessageTooBig, 1009),
]


@pytest.mark.parametrize(("case", "act", "error", "code"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_the_error_with_its_close_code(case, act, error, code) -> None:  # type: ignore[no-untyped-def]
    p = streaming()
    with pytest.raises(error) as info:
        act(p)
    assert info.value.close_code == code
    assert info.value.reason


def test_media_before_start_is_a_policy_violation() -> None:
    p = TelnyxStreamProtocol()
    p.receive_text(msg(event="connected", version="1.0.0"))
    with pytest.raises(PolicyViolation, match="not allowed in state connected"):
        p.receive_text(media(2, tone_frame()))


@pytest.mark.parametrize(("encoding", "rate", "channels"), [("OPUS", 8000, 1), ("G722", 8000, 1),
                                                            ("PCMU", 16000, 1), ("L16", 44100, 1),
                                                            ("PCMU", 8000, 2)])
def test_unsupported_media_format_is_refused_with_1003(encoding: str, rate: int, channels: int) -> None:
    p = TelnyxStreamProtocol()
    with pytest.raises(UnsupportedData) as info:
        p.receive_text(start(encoding=encoding, rate=rate, channels=channels))
    assert info.value.close_code == 1003


def test_every_protocol_error_is_a_protocol_error() -> None:
    for _, _, error, _ in BAD_INPUT:
        assert issubclass(error, ProtocolError)
