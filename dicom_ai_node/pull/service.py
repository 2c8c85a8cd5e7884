"""Pull one study (or series) from a configured source: find its series, retrieve each, report.

Used by the `pull` job (worker/pull_stage.py) and the `pull` CLI. Only UIDs, counts and the source name
appear in progress, results and logs: never patient data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.ingest import calling_label
from dicom_ai_node.domain.peers import Source
from dicom_ai_node.errors import ConfigError, PermanentPullError, TransientPullError
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.pull._dimse import qr_peer
from dicom_ai_node.pull.query import SeriesMatch, find_series
from dicom_ai_node.pull.retrieve import Counts, Receiver, c_get_series, c_move_series, wado_series
from dicom_ai_node.pull.web import dicomweb_client
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

# Result and presentation objects are not inputs: the node's own SEG/SR from an earlier run live in the
# same study (the Orthanc auto-forward script skips the same modalities).
SKIPPED_MODALITIES = frozenset({"SEG", "SR", "KO", "PR"})
_POLL_S = 0.2


@dataclass
class PullProgress:
    """Where a pull stands; `as_dict()` is what the job's progress and the CLI show."""

    source: str
    method: str
    study_instance_uid: str
    series_total: int = 0
    series_done: int = 0
    expected: int | None = None  # instances the source announced (C-FIND / QIDO-RS counts)
    retrieved: int = 0  # instances received (new or already stored)
    stored: int = 0  # of which new
    duplicates: int = 0  # of which already stored
    refused: int = 0  # not accepted by the node (SOP class)
    failed: int = 0  # sub-operations the PACS reports failed
    skipped_series: int = 0  # result / presentation series (SEG, SR, KO, PR)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        of = f" of {self.expected}" if self.expected is not None else ""
        text = (
            f"pulled study {self.study_instance_uid} from {self.source} over {self.method}: "
            f"{self.retrieved}{of} instances in {self.series_done} series "
            f"({self.stored} new, {self.duplicates} already here"
        )
        if self.refused or self.failed:
            text += f", {self.refused} refused, {self.failed} failed at the source"
        return text + f") in {self.elapsed_s:.1f} s"


ProgressFn = Callable[[PullProgress], None]


@dataclass
class Puller:
    settings: NodeSettings
    spool: Spool
    repo: SeriesRepository
    # C-MOVE: how long to wait for moved instances to show in the database after the PACS reported them
    # stored (they normally are already: our SCP answers each C-STORE after its commit).
    arrival_timeout_s: float = 30
    _started: float = field(default=0.0, init=False)

    def source(self, name: str) -> Source:
        try:
            return self.settings.source(name)
        except ConfigError as exc:
            raise PermanentPullError(f"no source named {name!r} in the node's configuration") from exc

    def pull(
        self,
        source_name: str,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        progress: ProgressFn | None = None,
    ) -> PullProgress:
        """Retrieve the study (or one series) into the spool + DB; raises StudyNotFoundError when the
        source does not have it, Transient/PermanentPullError for other failures."""
        source = self.source(source_name)
        self._started = time.monotonic()
        method = _method(source)
        state = PullProgress(source.name, method, study_instance_uid)
        series = find_series(source, study_instance_uid, self.settings.ae_title, series_instance_uid)
        wanted = [s for s in series if s.modality.upper() not in SKIPPED_MODALITIES]
        state.skipped_series = len(series) - len(wanted)
        if not wanted:
            raise PermanentPullError(
                f"{source.name}: study {study_instance_uid} holds only result series "
                f"({', '.join(sorted({s.modality for s in series}))}): nothing to process"
            )
        state.series_total = len(wanted)
        counts = [s.number_of_instances for s in wanted]
        state.expected = (
            sum(c for c in counts if c is not None) if all(c is not None for c in counts) else None
        )
        report = self._reporter(state, progress)
        report()
        if source.type == "dicomweb":
            self._wado(source, wanted, state, report)
        elif source.retrieve == "get":
            self._c_get(source, wanted, state, report)
        else:
            self._c_move(source, wanted, state, report)
        state.elapsed_s = time.monotonic() - self._started
        report()
        if state.retrieved == 0:
            raise TransientPullError(
                f"{source.name} sent none of the {state.expected or '?'} instances of study "
                f"{study_instance_uid} ({state.refused} refused, {state.failed} failed)"
            )
        log.info("%s", state.summary())
        return state

    def _reporter(self, state: PullProgress, progress: ProgressFn | None) -> Callable[[], None]:
        def report() -> None:
            state.elapsed_s = time.monotonic() - self._started
            if progress is not None:
                progress(state)

        return report

    def _receiver(self, calling: str, state: PullProgress, report: Callable[[], None]) -> Receiver:
        receiver = Receiver(self.spool, self.repo, self.settings.disk_reserve_mb * 1024 * 1024, calling)

        def on_instance() -> None:
            _copy_counts(receiver.counts, state)
            report()

        receiver.on_instance = on_instance
        return receiver

    def _c_get(
        self, source: Source, wanted: list[SeriesMatch], state: PullProgress, report: Callable[[], None]
    ) -> None:
        peer = qr_peer(source, self.settings.ae_title)
        receiver = self._receiver(peer.ae_title, state, report)
        for s in wanted:
            _done, failed = c_get_series(
                peer, state.study_instance_uid, s.series_instance_uid, receiver, _ignore
            )
            receiver.counts.failed += failed
            state.series_done += 1
            _copy_counts(receiver.counts, state)
            report()

    def _wado(
        self, source: Source, wanted: list[SeriesMatch], state: PullProgress, report: Callable[[], None]
    ) -> None:
        assert source.url is not None
        client = dicomweb_client(source.url, source.timeout_s)
        receiver = self._receiver(calling_label(source.name, "WADO"), state, report)
        for s in wanted:
            wado_series(client, source.name, state.study_instance_uid, s.series_instance_uid, receiver)
            state.series_done += 1
            _copy_counts(receiver.counts, state)
            report()

    def _c_move(
        self, source: Source, wanted: list[SeriesMatch], state: PullProgress, report: Callable[[], None]
    ) -> None:
        peer = qr_peer(source, self.settings.ae_title)
        destination = self.settings.ae_title
        for s in wanted:
            before = self._held(s.series_instance_uid)
            base = state.retrieved

            def on_subop(done: int, _total: int | None, base: int = base) -> None:
                state.retrieved = base + done
                report()

            try:
                done, failed = c_move_series(
                    peer, destination, state.study_instance_uid, s.series_instance_uid, on_subop
                )
            except PermanentPullError as exc:
                raise PermanentPullError(
                    f"{exc}; the source must know AE {destination} at this node's DICOM address, and "
                    "the node's SCP (dicom-ai-node serve) must be running and allow the source's AE"
                ) from exc
            state.failed += failed
            after = self._wait_for_arrivals(s.series_instance_uid, before, done, source)
            new = max(0, after - before)
            state.stored += new
            state.duplicates += max(0, done - new)
            state.retrieved = base + done
            state.series_done += 1
            report()

    def _held(self, series_instance_uid: str) -> int:
        row = self.repo.get_series(series_instance_uid)
        return row.instance_count if row is not None else 0

    def _wait_for_arrivals(self, series_instance_uid: str, before: int, moved: int, source: Source) -> int:
        """C-MOVE: wait until the series holds every moved instance (new ones counted from `before`)."""
        deadline = time.monotonic() + self.arrival_timeout_s
        held = self._held(series_instance_uid)
        # Duplicates do not raise the count, so the series must hold at least what was moved (normally it
        # already does: our SCP answers each C-STORE sub-operation only after its commit).
        target = max(before, moved)
        while held < target:
            if time.monotonic() > deadline:
                raise TransientPullError(
                    f"C-MOVE from {source.name}: {held} of {moved} instances of series {series_instance_uid} "
                    f"arrived within {self.arrival_timeout_s:.0f} s"
                )
            time.sleep(_POLL_S)
            held = self._held(series_instance_uid)
        return held


def _copy_counts(counts: Counts, state: PullProgress) -> None:
    state.stored, state.duplicates, state.refused = counts.stored, counts.duplicates, counts.refused
    state.failed = counts.failed
    state.retrieved = counts.received


def _ignore(_done: int, _total: int | None) -> None:
    """C-GET progress comes from the instances ingested, not from the PACS's sub-operation counts."""


def _method(source: Source) -> str:
    if source.type == "dicomweb":
        return "WADO-RS"
    return "C-GET" if source.retrieve == "get" else "C-MOVE"
