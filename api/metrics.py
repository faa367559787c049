"""``GET /metrics``: Prometheus exposition of what a node is doing (``prometheus-client``).

Read at scrape time, never on the media path.  The counters and histograms already kept for
``/api/stats`` (``engine.metrics.LagHistogram``, the components' own counters) are turned into metric
families by ``RuntimeCollector.collect`` when a scraper asks; nothing per frame calls into
``prometheus_client`` (one ``observe`` costs microseconds, a frame's whole budget is ~20).

Speech counters (utterances, transcripts, dropped audio, provider errors and failovers) live in each
speech pipeline while it runs; when it closes they are added to ``PipelineTotals.closed``.  A scrape
reports the closed sum plus every live pipeline's, which is monotonic: a pipeline's counts move from
one to the other in one step of the event loop.  Frames lost in transit likewise (``StreamLosses``).

What is exported (all prefixed ``switchboard_``)::

    family                              type       from
    streams_active / streams_pending    gauge      live calls / sockets awaiting `start`
    streams_total, streams_refused      counter    calls started here / refused at admission
    frames                              counter    media frames through the pipelines
    frame_lag_seconds                   histogram  arrival lag of inbound frames (1 in 4 sampled)
    loop_stall_seconds, gc_pause_seconds histogram the event loop's health
    utterances, transcripts{kind}       counter    VAD utterances; partial and final transcripts
    stt_time_to_final_seconds{provider} histogram  end of utterance (VAD) -> final from the recogniser
    stt_errors, stt_failovers,          counter    provider failures, chain switches, utterances that
      stt_failed_utterances                          got no final
    stage_queue_depth{stage}            gauge      stt (none: see stage_dropped), translation, bus,
                                                   writer, sse_waiting
    stage_dropped{stage}                counter    stt (audio refused by a lagging recogniser),
                                                   translation (shed, deadline), bus, writer
    translation_lag_seconds             histogram  submission -> translation
    translations{outcome}               counter    translated, shed, deadline, error
    sse_clients                         gauge      open event streams
    relay_watched, relay_relayed        gauge/counter other nodes' calls served here
    recordings{outcome}                 counter    stored, failed
    process_*                           (prometheus_client's process collector: CPU, memory, fds)

Several workers (``serve --workers``): each writes its own exposition to
``<data_dir>/metrics/w<i>.prom`` every ``SNAPSHOT_S`` (atomically); ``/metrics`` on any worker answers
its own families live plus the other workers' files, every sample labelled ``worker="<i>"``, so one
scrape of the port sees the node.  The parent empties the directory at start and removes a dead
worker's file (api/workers.py); a sum over ``worker`` is the node's figure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from engine.metrics import LagHistogram
from pipelines.call import CallPipeline, CallStats

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger("switchboard.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SNAPSHOT_S = 2.0  # a worker's file is at most this old (plus a scrape's own time)
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # LagHistogram keeps 1 ms buckets to 2 s
FINAL_BUCKETS_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10_000, 30_000)
MAX_PROVIDERS = 16  # time-to-final histograms kept (one per provider name; more are not recorded)


class PipelineTotals:
    """Speech pipelines' counters: every live pipeline's (calls' and agents' microphones) plus the sum
    of the closed ones'.  A pipeline's counts move from one to the other in the step that closes it."""

    def __init__(self) -> None:
        self.live: weakref.WeakSet[CallPipeline] = weakref.WeakSet()
        self.closed = CallStats()

    def track(self, pipeline: CallPipeline) -> None:
        self.live.add(pipeline)
        pipeline.on_closed = self._closed

    def _closed(self, pipeline: CallPipeline) -> None:
        if pipeline in self.live:
            self.live.discard(pipeline)
            _add(self.closed, pipeline.stats)

    def totals(self) -> CallStats:
        out = CallStats()
        _add(out, self.closed)
        for pipeline in list(self.live):
            _add(out, pipeline.stats)
        return out


def _add(into: CallStats, more: CallStats) -> None:
    for f in fields(CallStats):
        setattr(into, f.name, getattr(into, f.name) + getattr(more, f.name))


@dataclass(slots=True)
class StreamLosses:
    """Frames the Telnyx streams of ended calls lost or got too late (live calls' are added at scrape)."""

    late: int = 0
    lost: int = 0

    def add(self, late: int, lost: int) -> None:
        self.late += late
        self.lost += lost


class FinalLatency:
    """Time to final per recogniser: one ``LagHistogram`` per provider name (at most MAX_PROVIDERS)."""

    def __init__(self) -> None:
        self.by_provider: dict[str, LagHistogram] = {}

    def record(self, provider: str, seconds: float) -> None:
        hist = self.by_provider.get(provider)
        if hist is None:
            if len(self.by_provider) >= MAX_PROVIDERS:
                return
            hist = self.by_provider[provider] = LagHistogram(limit_ms=30_000)
        hist.record(seconds * 1000)


def histogram(name: str, doc: str, hist: LagHistogram, labels: dict[str, str] | None = None,
              family: HistogramMetricFamily | None = None,
              edges_ms: tuple[int, ...] = BUCKETS_MS) -> HistogramMetricFamily:
    """A LagHistogram (1 ms buckets, counts) as a Prometheus histogram in seconds."""
    fam = family or HistogramMetricFamily(name, doc, labels=list(labels or ()))
    counts = hist.buckets()
    buckets: list[tuple[str, float]] = []
    seen = 0
    start = 0
    for le_ms in edges_ms:
        end = min(le_ms, hist.limit_ms)
        seen += sum(counts[start:end])
        start = end
        buckets.append((repr(le_ms / 1000), float(seen)))
    buckets.append(("+Inf", float(hist.count)))
    fam.add_metric(list((labels or {}).values()), buckets, hist.sum_ms / 1000)
    return fam


class RuntimeCollector(Collector):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        rt = self.rt
        p = "switchboard_"
        live = rt.pipeline_totals.totals()
        late, lost = rt.stream_losses.late, rt.stream_losses.lost
        for session in rt.calls:
            late += session.leg.protocol.stats.late
            lost += session.leg.protocol.stats.lost

        yield GaugeMetricFamily(p + "streams_active", "Live media streams (calls) on this process",
                                value=len(rt.calls))
        yield GaugeMetricFamily(p + "streams_pending", "Media sockets connected and awaiting `start`",
                                value=rt.admission.total)
        yield CounterMetricFamily(p + "streams", "Media streams started", value=rt.stats.streams_total)
        yield CounterMetricFamily(p + "streams_refused", "Media sockets refused at admission",
                                  value=rt.admission.refused)
        yield CounterMetricFamily(p + "frames", "Media frames through the pipelines", value=live.frames)
        frames_lost = CounterMetricFamily(p + "frames_lost", "Media frames lost in transit or too late",
                                          labels=["why"])
        frames_lost.add_metric(["lost"], lost)
        frames_lost.add_metric(["late"], late)
        yield frames_lost
        yield histogram(p + "frame_lag_seconds", "Arrival lag of inbound media frames", rt.stats.frame_lag)
        yield histogram(p + "loop_stall_seconds", "How late a 10 ms event-loop timer fires", rt.stats.loop_stall)
        yield histogram(p + "gc_pause_seconds", "Cyclic garbage-collector pauses", rt.stats.gc_pause)

        yield CounterMetricFamily(p + "utterances", "Utterances the VAD found", value=live.utterances)
        transcripts = CounterMetricFamily(p + "transcripts", "Transcripts from the recognisers", labels=["kind"])
        transcripts.add_metric(["partial"], live.partials)
        transcripts.add_metric(["final"], live.finals)
        yield transcripts
        ttf = HistogramMetricFamily(p + "stt_time_to_final_seconds",
                                    "End of an utterance (VAD) to its final transcript", labels=["provider"])
        for provider, hist in sorted(rt.final_latency.by_provider.items()):
            histogram("", "", hist, {"provider": provider}, family=ttf, edges_ms=FINAL_BUCKETS_MS)
        yield ttf
        yield CounterMetricFamily(p + "stt_errors", "Recogniser failures (open or session)", value=live.stt_errors)
        yield CounterMetricFamily(p + "stt_failovers", "Switches to the next recogniser of a chain",
                                  value=live.stt_failovers)
        yield CounterMetricFamily(p + "stt_failed_utterances", "Utterances that got no final",
                                  value=live.stt_failed_utterances)

        depth = GaugeMetricFamily(p + "stage_queue_depth", "Items waiting per pipeline stage", labels=["stage"])
        dropped = CounterMetricFamily(p + "stage_dropped", "Items dropped (counted, reported) per stage",
                                      labels=["stage"])
        dropped.add_metric(["stt"], live.stt_dropped)
        if rt.translation is not None:
            st = rt.translation.stats
            depth.add_metric(["translation"], rt.translation.pending)
            dropped.add_metric(["translation"], st.shed + st.deadline)
            outcomes = CounterMetricFamily(p + "translations", "Translations by outcome", labels=["outcome"])
            for outcome, n in (("translated", st.translated), ("shed", st.shed), ("deadline", st.deadline),
                               ("error", st.errors)):
                outcomes.add_metric([outcome], n)
            yield outcomes
            yield histogram(p + "translation_lag_seconds", "Submission to translation", rt.translation.lag)
        if rt.bus is not None:
            depth.add_metric(["bus"], rt.bus.pending)
            dropped.add_metric(["bus"], rt.bus.dropped)
        if rt.persistence is not None:
            writer = rt.tiers.writer if rt.tiers is not None else None
            if writer is not None:
                depth.add_metric(["writer"], writer.pending)
                dropped.add_metric(["writer"], writer.stats.dropped)
            recordings = CounterMetricFamily(p + "recordings", "Call recordings by outcome", labels=["outcome"])
            recordings.add_metric(["stored"], rt.persistence.recordings_stored)
            recordings.add_metric(["failed"], rt.persistence.recordings_failed)
            yield recordings
        depth.add_metric(["sse_waiting"], rt.hub.waiting)
        yield depth
        yield dropped
        yield GaugeMetricFamily(p + "sse_clients", "Open SSE event streams", value=rt.stats.sse_clients)
        if rt.relay is not None:
            yield GaugeMetricFamily(p + "relay_watched", "Other nodes' calls watched for SSE clients here",
                                    value=rt.relay.watched)
            yield CounterMetricFamily(p + "relay_relayed", "Events relayed from other nodes", value=rt.relay.relayed)


def registry_for(rt: Runtime) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RuntimeCollector(rt))
    ProcessCollector(registry=reg)
    return reg


class _Merged(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge(expositions: dict[int, bytes]) -> bytes:
    """Several workers' expositions as one, each sample labelled with its worker."""
    merged: dict[str, Metric] = {}
    for worker, text in sorted(expositions.items()):
        for fam in text_string_to_metric_families(text.decode()):
            into = merged.get(fam.name)
            if into is None:
                into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                into.samples.append(s._replace(labels={**s.labels, "worker": str(worker)}))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged(merged.values()))
    return generate_latest(reg)


class Exposition:
    """This process's metrics, and (as a worker) its snapshot file and its siblings' files."""

    def __init__(self, rt: Runtime) -> None:
        self.registry = registry_for(rt)
        self.worker = rt.settings.worker_index
        self.dir = rt.settings.data_dir.resolve() / "metrics"
        self._task: asyncio.Task[None] | None = None

    def own(self) -> bytes:
        return generate_latest(self.registry)

    def start(self) -> None:
        if self.worker is not None:
            self._task = asyncio.get_running_loop().create_task(self._snapshots(), name="metrics-snapshot")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _snapshots(self) -> None:
        path = self.dir / f"w{self.worker}.prom"
        while True:
            try:
                await asyncio.to_thread(_write_atomic, path, self.own())
            except OSError as exc:
                log.warning("metrics.snapshot_failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(SNAPSHOT_S)

    async def render(self) -> bytes:
        own = self.own()
        if self.worker is None:
            return own
        others = await asyncio.to_thread(_read_siblings, self.dir, self.worker)
        return await asyncio.to_thread(merge, {**others, self.worker: own})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_siblings(directory: Path, me: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    try:
        entries = list(directory.glob("w*.prom"))
    except OSError:
        return out
    for path in entries:
        index = path.stem[1:]
        if not index.isdigit() or int(index) == me:
            continue
        try:
            out[int(index)] = path.read_bytes()
        except OSError:  # removed between the listing and the read: that worker is gone
            continue
    return out
