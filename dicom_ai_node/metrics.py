"""Prometheus metrics of one node process (prometheus-client), scraped at /metrics or the worker's port.

Each `NodeMetrics` owns its CollectorRegistry (never the library's global one), so tests and several
nodes in one process keep separate counts. Queue gauges are read from the database at scrape time by a
custom collector; event counters and histograms are moved by the receive edge and the worker stages.

Labels carry only low-cardinality names from configuration or code: job kinds and states, stage names,
model and destination names, DIMSE status codes. Never UIDs, AE titles of senders or anything from a
patient's header.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_ai_node.domain.jobs import QueueStats

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# One stage (load, infer, encode) of one series: a small CT loads in 50 ms, a slow CPU model takes minutes;
# the inference host's timeout bounds it at tens of minutes.
STAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# One delivery (send + read-back) of a SEG and an SR: sub-second on a LAN, minutes for a slow PACS.
DELIVERY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Last instance received -> results delivered: quiet period + queue wait + inference + delivery,
# seconds on an idle node, up to an hour behind a backlog or a PACS outage.
RECEIVE_TO_DELIVERED_BUCKETS_S = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


JobCounts = Callable[[], Mapping[str, int]]
QueueStatsSource = Callable[[], Mapping[str, QueueStats]]
_T = TypeVar("_T")


def status_label(status: int) -> str:
    """A DIMSE status as Prometheus label: 0xA700 -> "0xA700" (PS3.7 Annex C spelling)."""
    return f"0x{status:04X}"


class _QueueCollector(Collector):
    """Job gauges read at scrape time; a database that fails then costs those families, not the scrape."""

    def __init__(self, job_counts: JobCounts | None, queue_stats: QueueStatsSource | None) -> None:
        self._job_counts = job_counts
        self._queue_stats = queue_stats
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {"job_counts": 0, "queue_stats": 0}
        self._failing: set[str] = set()

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check names at registration without querying the database.
        return [*self._job_families(), *self._stats_families(), self._errors_family()]

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        if self._job_counts is not None:
            counts = self._read("job_counts", self._job_counts)
            if counts is not None:
                jobs_family = self._job_families()[0]
                for key, n in sorted(counts.items()):
                    kind, _, status = key.partition("/")
                    jobs_family.add_metric([kind, status], n)
                families.append(jobs_family)
        if self._queue_stats is not None:
            stats = self._read("queue_stats", self._queue_stats)
            if stats is not None:
                depth, oldest = self._stats_families()
                for kind, s in sorted(stats.items()):
                    depth.add_metric([kind], s.depth)
                    oldest.add_metric([kind], s.oldest_age_s)
                families += [depth, oldest]
        errors = self._errors_family()
        with self._lock:
            for source, n in sorted(self._errors.items()):
                errors.add_metric([source], n)
        families.append(errors)
        return families

    def _read(self, source: str, fn: Callable[[], _T]) -> _T | None:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - any DB/driver error: skip these families, keep the rest
            with self._lock:
                self._errors[source] += 1
                first = source not in self._failing
                self._failing.add(source)
            # One warning per outage, not one per scrape (Prometheus scrapes every few seconds).
            if first:
                log.warning("metrics: %s failed at scrape, its gauges are left out: %s", source, exc)
            return None
        with self._lock:
            recovered = source in self._failing
            self._failing.discard(source)
        if recovered:
            log.info("metrics: %s answers again", source)
        return value

    @staticmethod
    def _job_families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "ainode_jobs", "Jobs in the queue by kind and status", labels=["kind", "status"]
            )
        ]

    @staticmethod
    def _stats_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "ainode_queue_depth", "Jobs waiting to run (queued or failed awaiting retry)", labels=["kind"]
            ),
            GaugeMetricFamily(
                "ainode_queue_oldest_age_seconds",
                "Age of the oldest waiting job (0 when none waits)",
                labels=["kind"],
            ),
        )

    @staticmethod
    def _errors_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "ainode_scrape_errors",
            "Scrapes whose queue gauges could not be read (database unavailable)",
            labels=["source"],
        )


class NodeMetrics:
    """The node's metrics; `observe_*` are called by the receive edge and the worker, `render()` by HTTP."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        queue_stats: QueueStatsSource | None = None,
        job_counts: JobCounts | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "ainode_instances_received",
            "Instances answered with C-STORE Success (duplicates included: they are kept once)",
            registry=r,
        )
        self.received_bytes = Counter(
            "ainode_received_bytes", "Bytes of the instances answered with Success", registry=r
        )
        self.cstore_responses = Counter(
            "ainode_cstore_responses", "C-STORE responses by DIMSE status", ["status"], registry=r
        )
        self.stage_duration = Histogram(
            "ainode_stage_duration_seconds",
            "Duration of one infer stage (load, infer, encode) by model",
            ["stage", "model"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.delivery_duration = Histogram(
            "ainode_delivery_duration_seconds",
            "Duration of a successful delivery (send and read-back) by destination",
            ["destination"],
            buckets=DELIVERY_BUCKETS_S,
            registry=r,
        )
        self.delivery_failures = Counter(
            "ainode_delivery_failures",
            "Delivery attempts that failed, by destination",
            ["destination"],
            registry=r,
        )
        self.deliveries_unverified = Counter(
            "ainode_deliveries_unverified",
            "Deliveries stored but not read back: the destination offers no C-FIND / QIDO-RS (verify is on)",
            ["destination"],
            registry=r,
        )
        self.receive_to_delivered = Histogram(
            "ainode_receive_to_delivered_seconds",
            "Last instance of a series received -> its results delivered to a destination",
            buckets=RECEIVE_TO_DELIVERED_BUCKETS_S,
            registry=r,
        )
        self.jobs_finished = Counter(
            "ainode_jobs_finished",
            "Job attempts finished by kind and outcome (failed = retried later, dead = dead letter)",
            ["kind", "status"],
            registry=r,
        )
        self._queue_collector = _QueueCollector(job_counts, queue_stats)
        r.register(self._queue_collector)

    def observe_store(self, status: int, size_bytes: int) -> None:
        self.cstore_responses.labels(status=status_label(status)).inc()
        if status == 0x0000:
            self.instances_received.inc()
            self.received_bytes.inc(max(0, size_bytes))

    def observe_stage(self, stage: str, model: str, seconds: float) -> None:
        self.stage_duration.labels(stage=stage, model=model).observe(seconds)

    def observe_delivery(self, destination: str, seconds: float, ok: bool) -> None:
        if ok:
            self.delivery_duration.labels(destination=destination).observe(seconds)
        else:
            self.delivery_failures.labels(destination=destination).inc()

    def observe_unverified(self, destination: str) -> None:
        self.deliveries_unverified.labels(destination=destination).inc()

    def observe_receive_to_delivered(self, seconds: float) -> None:
        self.receive_to_delivered.observe(max(0.0, seconds))

    def observe_job_finished(self, kind: str, status: str) -> None:
        self.jobs_finished.labels(kind=kind, status=status).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this node's registry."""
        return generate_latest(self.registry)

    def sample_labels(self) -> Iterator[dict[str, str]]:
        """Every label set currently exposed (for tests and checks that no UID leaks into a label)."""
        for family in self.registry.collect():
            for sample in family.samples:
                yield dict(sample.labels)


def start_metrics_server(metrics: NodeMetrics, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve `metrics` on http://host:port/metrics from a daemon thread (a worker process has no admin HTTP).

    Returns the server and its thread; `server.shutdown()` stops it (the CLI just lets the process exit).
    """
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server, thread
