"""The I/O-free signalling checks: good offers pass, each bad request fails with its own message."""

from __future__ import annotations

import orjson
import pytest

from api.webrtc_signal import MAX_SDP_BYTES, OfferRequest, SignalError, check_sdp, parse_offer_request

LANGS = ["en", "es"]

# An offer as aiortc (and, in the parts checked here, Chromium) writes it.
GOOD_SDP = "\r\n".join([
    "v=0", "o=- 3935 3935 IN IP4 0.0.0.0", "s=-", "t=0 0", "a=group:BUNDLE 0", "a=msid-semantic:WMS *",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0 8", "c=IN IP4 0.0.0.0", "a=sendrecv", "a=mid:0", "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
    "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host", "a=end-of-candidates",
    "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuv", "a=fingerprint:sha-256 " + ":".join(["AA"] * 32),
    "a=setup:actpass", "",
])


def body(**override: object) -> bytes:
    fields: dict[str, object] = {"call_id": "v3:call-1", "agent_id": "agent-7", "sdp": GOOD_SDP, "type": "offer"}
    fields.update(override)
    return orjson.dumps({k: v for k, v in fields.items() if v is not ...})


def test_a_good_offer_parses_with_the_default_language() -> None:
    assert parse_offer_request(body(), LANGS) == OfferRequest("v3:call-1", GOOD_SDP, "en")  # agent_id: ignored
    assert parse_offer_request(body(language="es"), LANGS).language == "es"


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "body is not valid JSON"),
    (b"[1, 2]", "body must be a JSON object"),
    (body(call_id=...), "missing field 'call_id'"),
    (body(call_id=5), "field 'call_id' must be a string, got int"),
    (body(call_id="bad id!"), "call_id must be 1-128 characters of [A-Za-z0-9:_-.]"),
    (body(call_id="x" * 257), "call_id must be 1-128 characters of [A-Za-z0-9:_-.]"),
    (body(type="answer"), "type must be 'offer', got 'answer'"),
    (body(type=None), "field 'type' must be a string, got NoneType"),
    (body(language="fr"), "language must be one of ['en', 'es'], got 'fr'"),
    (body(sdp=...), "missing field 'sdp'"),
    (body(sdp=["v=0"]), "field 'sdp' must be a string, got list"),
])
def test_each_malformed_request_fails_with_its_precise_message(raw: bytes, message: str) -> None:
    with pytest.raises(SignalError) as err:
        parse_offer_request(raw, LANGS)
    assert err.value.message.startswith(message), err.value.message


@pytest.mark.parametrize(("sdp", "message"), [
    ("", "sdp must start with 'v=0'"),
    ("hello", "sdp must start with 'v=0'"),
    (GOOD_SDP.replace("m=audio", "m=video"), "sdp has no audio m-line"),
    (GOOD_SDP.replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 G722/8000"),
     "sdp audio does not offer Opus (a=rtpmap:<pt> opus/48000/2)"),
    (GOOD_SDP.replace("SAVPF 111 0 8", "SAVPF 0 8"),  # Opus mapped but not offered on the m-line
     "sdp audio does not offer Opus (a=rtpmap:<pt> opus/48000/2)"),
    (GOOD_SDP + "a=x:" + "y" * MAX_SDP_BYTES, f"sdp is too large: {len(GOOD_SDP) + 4 + MAX_SDP_BYTES} bytes"),
])
def test_each_malformed_sdp_fails_with_its_precise_message(sdp: str, message: str) -> None:
    with pytest.raises(SignalError) as err:
        check_sdp(sdp)
    assert err.value.message.startswith(message), err.value.message


def test_sdp_checks_accept_lf_line_ends_and_opus_in_a_second_audio_section() -> None:
    check_sdp(GOOD_SDP.replace("\r\n", "\n"))
    no_opus = GOOD_SDP.split("m=audio")[1].replace("a=rtpmap:111 opus/48000/2", "")
    check_sdp(GOOD_SDP.split("m=audio")[0] + "m=audio" + no_opus + "m=audio" + GOOD_SDP.split("m=audio")[1])
