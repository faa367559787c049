"""``switchboard bench latency`` end to end, small: two calls against a server it spawns itself.

With the fake provider answering each Finalize 200 ms later, the agent's wait for a final must
include that delay (and the VAD's hangover), the engine's own share must be small, every utterance
must get its final with its text intact, and the JSON and the PNG must be written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson


def test_the_latency_harness_measures_two_calls_against_a_fake_provider(tmp_path: Path) -> None:
    out, png = tmp_path / "latency.json", tmp_path / "latency.png"
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "bench", "latency", "--calls", "2", "--stt", "fake",
         "--stt-delay-ms", "200", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "N=2" in proc.stdout and "calls" in proc.stderr  # the table, and the progress bar
    result = orjson.loads(out.read_bytes())
    (level,) = result["levels"]
    assert level["calls"] == 2 and level["utterances"] == 8  # four sentences per call
    assert level["missing_finals"] == 0 and level["calls_failed"] == []
    assert level["wer"] == 0.0  # what the fake said is what the agent read
    assert level["frames_lost"] == 0
    final, added = level["final_ms"], level["added_ms"]
    assert added["n"] == 8
    assert final["p50"] > 200  # the provider's delay is inside the agent's wait
    assert added["p99"] < 100  # the engine's own share (the README records the measured figure)
    assert level["partial_ms"]["n"] == 8 and level["translation_ms"]["n"] == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
