"""``switchboard simulate-call`` (``api/simulator.py``) against the real server, storage off: the only
credentials are then the server's ``SWITCHBOARD_TELNYX_STREAM_TOKEN`` and ``SWITCHBOARD_BOOTSTRAP_API_KEY``.

* With no WAV argument it plays the speech sample shipped in the package (8 kHz mono, under 100 KB,
  no espeak-ng needed), takes the media token and API key from the data directory's ``demo.json``
  when not given, and prints the call's transcript read back over SSE within the stated WER bound.
* A wrong media token ends with exit code 1 and the server's close code, not a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import soundfile

from api.simulator import SAMPLE_TEXT, SAMPLE_WAV
from tests.servers import Server, running_server
from tests.speech import word_error_rate

TOKEN = "simulate-test-media-token"
API_KEY = "sbk_simulate-test-api-key-0123456789"
# pocketsphinx with a domain LM that holds the sample's sentence among others, on espeak-ng speech.
MAX_WER = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("simulate")
    phrases = tmp / "phrases.txt"
    phrases.write_text(f"{SAMPLE_TEXT}\nplease confirm your account number\ncan you call me back tomorrow\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_TELNYX_STREAM_TOKEN=TOKEN, SWITCHBOARD_BOOTSTRAP_API_KEY=API_KEY) as srv:
        yield srv


def simulate(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWITCHBOARD_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "api.cli", "simulate-call", *args], env=env, capture_output=True,
                          text=True, timeout=90)


def test_the_shipped_sample_is_small_telephone_speech() -> None:
    info = soundfile.info(SAMPLE_WAV)
    assert (info.samplerate, info.channels) == (8000, 1)
    assert 2.0 <= info.duration <= 6.0
    assert SAMPLE_WAV.stat().st_size < 100_000


def test_simulate_call_plays_the_shipped_sample_with_the_demo_credentials_and_prints_the_transcript(
    server: Server, tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "demo.json").write_bytes(orjson.dumps({
        "org_id": "00000000-0000-0000-0000-000000000001", "user_id": "00000000-0000-0000-0000-000000000002",
        "email": "demo@switchboard.local", "password": "unused", "api_key": API_KEY, "media_token": TOKEN}))
    done = simulate(data, "--url", server.ws)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    found = re.search(r"^call_id (v3:[0-9a-f-]{36}): streaming", done.stderr, re.M)
    assert found, done.stderr  # a fresh id when none is given
    assert lines[0] == f"-- call.started {found[1]}", lines
    assert lines[-1] == f"-- call.ended {found[1]}"
    finals = [line.split("] ", 1)[1] for line in lines if "inbound] " in line]
    assert finals, done.stdout
    wer = word_error_rate(SAMPLE_TEXT, " ".join(finals))
    print(f"\nsample transcript {finals} WER {wer:.2f}")
    assert wer <= MAX_WER


def test_simulate_call_with_a_wrong_token_says_why_and_exits_1(server: Server, tmp_path: Path) -> None:
    done = simulate(tmp_path, "--url", server.ws, "--token", "wrong", "--api-key", API_KEY, "--quiet")
    assert done.returncode == 1
    assert "server closed with 1008" in done.stderr and "Traceback" not in done.stderr
