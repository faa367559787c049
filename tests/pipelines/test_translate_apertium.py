"""The Apertium translator against the real Debian apertium (apt-get install apertium apertium-eng-spa)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pipelines.translate import apertium
from pipelines.translate.apertium import ApertiumTranslator
from pipelines.translate.apertium_format import deformat, reformat
from pipelines.translate.base import TranslationError, TranslationTimeout
from pipelines.translate.markers import PLACEHOLDER, markers

MODES = Path("/usr/share/apertium/modes")
pytestmark = pytest.mark.skipif(
    shutil.which("apertium") is None or not (MODES / "eng-spa.mode").exists() or not (MODES / "spa-eng.mode").exists(),
    reason="Debian apertium with the eng-spa pair is not installed (apt-get install apertium apertium-eng-spa)",
)

ONE_PROCESS_PER_SENTENCE_S = 0.13  # `echo ... | apertium eng-spa`, measured on the dev VM (0.09-0.13 s)

SENTENCES_EN = [
    "I would like to make a payment",
    "Can you help me with my account?",
    "My card was declined yesterday.",
    "Please send me the invoice by email.",
    "I have been waiting for twenty minutes.",
]


@pytest.fixture
async def translator() -> AsyncIterator[ApertiumTranslator]:
    t = ApertiumTranslator()
    await t.start()
    try:
        yield t
    finally:
        await t.aclose()


async def test_english_to_spanish_is_plausible(translator: ApertiumTranslator) -> None:
    hello = await translator.translate("hello", "en", "es", deadline_s=5)
    payment = await translator.translate("I would like to make a payment", "en", "es", deadline_s=5)
    bill = await translator.translate("I want to pay my bill.", "en", "es", deadline_s=5)
    assert "hola" in hello.translated.lower()
    assert "pago" in payment.translated.lower()
    assert "factura" in bill.translated.lower() and bill.translated.endswith(".")
    assert (payment.provider, payment.source_lang, payment.target_lang) == ("apertium", "en", "es")
    assert payment.original == "I would like to make a payment"


async def test_spanish_to_english_is_plausible(translator: ApertiumTranslator) -> None:
    hola = await translator.translate("hola", "es", "en", deadline_s=5)
    payment = await translator.translate("Quiero hacer un pago", "es", "en", deadline_s=5)
    account = await translator.translate("¿Puede ayudarme con mi cuenta?", "es", "en", deadline_s=5)
    assert "hello" in hola.translated.lower()
    assert "payment" in payment.translated.lower()
    assert "account" in account.translated.lower()
    assert "¿" not in account.translated and "*" not in account.translated


async def test_fifty_sequential_translations_reuse_one_process_and_are_fast(translator: ApertiumTranslator) -> None:
    pid = translator.process_id("en", "es")
    assert pid is not None
    latencies = []
    for i in range(50):
        t0 = time.perf_counter()
        result = await translator.translate(SENTENCES_EN[i % len(SENTENCES_EN)], "en", "es", deadline_s=5)
        latencies.append(time.perf_counter() - t0)
        assert result.translated
    mean = statistics.mean(latencies)
    print(
        f"\napertium en->es: 50 sequential sentences, mean {mean * 1000:.2f} ms, "
        f"max {max(latencies) * 1000:.2f} ms, one process per sentence ~{ONE_PROCESS_PER_SENTENCE_S * 1000:.0f} ms"
    )
    assert translator.process_id("en", "es") == pid
    assert translator.spawn_count("en", "es") == 1
    assert mean < ONE_PROCESS_PER_SENTENCE_S / 10


async def test_concurrent_requests_come_back_matched_to_their_inputs(translator: ApertiumTranslator) -> None:
    templates = ["I have {} dogs", "Call me at {} please", "The invoice {} was paid", "I want {} apples"]
    markers = ["perros", "llamo", "factura", "manzanas"]
    texts = [templates[i % 4].format(1000 + i) for i in range(40)]
    results = await asyncio.gather(*(translator.translate(t, "en", "es", deadline_s=10) for t in texts))
    for i, (text, result) in enumerate(zip(texts, results, strict=True)):
        assert result.original == text
        assert str(1000 + i) in result.translated and markers[i % 4] in result.translated.lower(), (text, result)
    assert translator.spawn_count("en", "es") == 1


async def test_killed_process_is_restarted_by_the_next_request(translator: ApertiumTranslator) -> None:
    pid = translator.process_id("en", "es")
    assert pid is not None
    for stage in translator.stage_pids("en", "es"):
        with contextlib.suppress(ProcessLookupError):  # a later stage may already have exited on EOF
            os.kill(stage, signal.SIGKILL)
    result = await translator.translate("hello", "en", "es", deadline_s=5)
    assert "hola" in result.translated.lower()
    new_pid = translator.process_id("en", "es")
    assert new_pid is not None and new_pid != pid
    assert translator.spawn_count("en", "es") == 2
    assert (await translator.translate("I would like to make a payment", "en", "es", deadline_s=5)).translated


async def test_hung_process_is_killed_restarted_and_the_request_times_out(translator: ApertiumTranslator) -> None:
    pid = translator.process_id("en", "es")
    assert pid is not None
    stages = translator.stage_pids("en", "es")
    for stage in stages:
        os.kill(stage, signal.SIGSTOP)  # alive but answering nothing: a hang (stopped, none exits)
    try:
        t0 = time.monotonic()
        with pytest.raises(TranslationTimeout):
            await translator.translate("hello", "en", "es", deadline_s=0.3)
        assert time.monotonic() - t0 < 0.6
        new_pid = translator.process_id("en", "es")
        assert new_pid is not None and new_pid != pid
    finally:
        for stage in stages:
            try:
                os.kill(stage, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed, as it should be
    assert "hola" in (await translator.translate("hello", "en", "es", deadline_s=5)).translated.lower()


async def test_newlines_unknown_words_and_reserved_characters_round_trip(translator: ApertiumTranslator) -> None:
    text = "my name is Xzqwerty\nand I live in Blorfington\n\nthe price is $5 @ 3 [x] {y} <z> x/y x\\y"
    result = await asyncio.wait_for(translator.translate(text, "en", "es", deadline_s=5), 6)
    out = result.translated
    assert out.count("\n") == 3
    assert "Xzqwerty" in out and "Blorfington" in out
    assert "*" not in out and "#" not in out
    for piece in ("$5", "@ 3", "[x]", "{y}", "<z>", "x/y", "x\\y"):
        assert piece in out, (piece, out)
    # The reserved characters did not poison the process: the next answer is still right.
    assert "hola" in (await translator.translate("hello", "en", "es", deadline_s=5)).translated.lower()
    assert translator.spawn_count("en", "es") == 1


async def test_a_poisoned_process_fails_the_request_instead_of_answering_empty(
    translator: ApertiumTranslator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without escaping, "@" makes lt-proc report "Malformed input stream" and answer empty forever.
    monkeypatch.setattr(apertium, "deformat", lambda text, keep=None: text + ".[]")
    with pytest.raises(TranslationError, match="failed twice"):
        await translator.translate("a @ b", "en", "es", deadline_s=5)
    monkeypatch.undo()
    assert "hola" in (await translator.translate("hello", "en", "es", deadline_s=5)).translated.lower()
    assert translator.spawn_count("en", "es") == 3


async def test_empty_and_blank_text_translate_to_empty(translator: ApertiumTranslator) -> None:
    assert (await translator.translate("", "en", "es", deadline_s=5)).translated == ""
    assert (await translator.translate(" \n ", "es", "en", deadline_s=5)).translated == ""


async def test_busy_past_max_pending_and_unsupported_pairs() -> None:
    async with ApertiumTranslator(pairs=[("en", "es")], max_pending=2) as t:
        assert t.supports("en", "es") and not t.supports("es", "en")
        with pytest.raises(TranslationError, match="not supported"):
            await t.translate("hola", "es", "en", deadline_s=5)
        tasks = [asyncio.create_task(t.translate("hello", "en", "es", deadline_s=5)) for _ in range(4)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
    busy = [r for r in results if isinstance(r, TranslationError)]
    assert len(busy) == 1 and "busy" in str(busy[0])  # one translating, two waiting, the fourth refused
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3


async def test_translate_without_start_spawns_on_first_use() -> None:
    t = ApertiumTranslator(pairs=[("es", "en")])
    try:
        assert t.process_id("es", "en") is None
        assert "hello" in (await t.translate("hola", "es", "en", deadline_s=5)).translated.lower()
    finally:
        await t.aclose()
    with pytest.raises(TranslationError, match="closed"):
        await t.translate("hola", "es", "en", deadline_s=5)


async def test_missing_binary_is_a_clear_error() -> None:
    t = ApertiumTranslator(binary="no-such-apertium")
    with pytest.raises(TranslationError, match="not found"):
        await t.start()
    await t.aclose()


# -- the stream format, without I/O ----------------------------------------------------------------


def test_deformat_escapes_reserved_characters_and_wraps_non_space_blanks() -> None:
    assert deformat("hello") == "hello.[]"
    assert deformat("  a $5 @x  ") == "a \\$5 \\@x.[]"
    assert deformat("one\ntwo\tthree") == "one[\n]two[\t]three.[]"
    assert deformat("para\n\nnext") == "para.[][\n\n]next.[]"
    assert deformat("a\0b") == "a b.[]"


MARKED = [
    ("en", "es", "i would like to pay, my number is [REDACTED:phone] thanks"),
    ("en", "es", "My card is [REDACTED:card] and my email [REDACTED:email]."),
    ("en", "es", "[REDACTED:ssn] is my social"),
    ("en", "es", "my date of birth is [REDACTED:dob]. call me at [REDACTED:phone]"),
    ("es", "en", "Mi número es [REDACTED:phone] y mi tarjeta [REDACTED:card] gracias"),
    ("es", "en", "Mi número de teléfono es [REDACTED:phone]."),
]


async def test_redaction_markers_come_back_byte_for_byte_in_order_both_ways(translator: ApertiumTranslator) -> None:
    for src, tgt, text in MARKED:
        result = await translator.translate(text, src, tgt, deadline_s=5)
        assert markers(result.translated) == markers(text), (text, result.translated)
        assert "[*" not in result.translated and "teléfono]" not in result.translated
    # The words around them are still translated.
    phone = await translator.translate(MARKED[0][2], "en", "es", deadline_s=5)
    assert "número" in phone.translated and "gracias" in phone.translated
    assert translator.markers_lost == 0


def test_deformat_sends_kept_spans_as_superblanks() -> None:
    assert deformat("call [REDACTED:phone] now", keep=PLACEHOLDER) == "call [\\[REDACTED:phone\\]] now.[]"
    assert reformat("llama [\\[REDACTED:phone\\]] ahora.[]") == "llama [REDACTED:phone] ahora"


def test_reformat_strips_marks_and_end_marks() -> None:
    assert reformat("hola.[]") == "hola"
    assert reformat("¿Hola?.[]") == "¿Hola?"
    assert reformat("Mi nombre es *Xzqwerty y  vivo en #Foo @Bar.[]") == "Mi nombre es Xzqwerty y vivo en Foo Bar"
    assert reformat("a \\$5 \\@ 3 * 4 # b.[]") == "a $5 @ 3 * 4 # b"
    assert reformat("uno[\n]dos.[][\n\n]tres.[]") == "uno\ndos\n\ntres"
    assert reformat(" Quiero pagar.[]") == "Quiero pagar"


def test_it_runs_on_uvloop_as_the_server_does() -> None:
    """The server's event loop is uvloop, whose subprocess support is narrower than asyncio's."""
    import uvloop

    async def main() -> str:
        t = ApertiumTranslator()
        await t.start()
        try:
            return (await t.translate("hello", "en", "es", deadline_s=5)).translated
        finally:
            await t.aclose()

    assert "hola" in uvloop.run(main()).lower()
