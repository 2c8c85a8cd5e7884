"""Scale-out on PostgreSQL, as deploy/kubernetes/ runs it: two receivers (`serve --no-workers`) and two
separate `worker` processes share one database and one spool directory, on loopback.

A chest CT sent to receiver A and another sent to receiver B are both processed by the worker processes
(never by a receiver); one worker is killed with kill -9 in the middle of its inference, and the other
finishes that job after its lease expires. Each series gets exactly one infer job, one SEG and one SR
(in the database and at the destination, a DCMTK storescp), and every acknowledged instance is there.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
import yaml
from pydicom import dcmread

from dicom_ai_node.devtools.datasets import SeriesInfo, lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.repo import ROOT, checkout_file
from dicom_ai_node.persistence.db import make_engine
from dicom_ai_node.persistence.tables import results

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

# Short leases so the killed worker's job comes back within seconds (the default is 120 s); every
# process runs the stalled-job recovery every heartbeat_s.
WORKER_SETTINGS = {
    "lease_s": 6,
    "heartbeat_s": 1,
    "poll_interval_s": 0.2,
    "backoff_base_s": 1,
    "backoff_cap_s": 5,
}
T = TypeVar("T")


def _wait(predicate: Callable[[], T | None], timeout_s: float, what: str, logs: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")


class WorkerProcess:
    """`dicom-ai-node worker` as its own process with its own metrics port (as a pod of a GPU pool)."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] = self._launch()

    def _launch(self) -> subprocess.Popen[bytes]:
        self.metrics_port = free_port()
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicom_ai_node.cli",
                    "worker",
                    "-c",
                    str(self.config),
                    "--metrics-port",
                    str(self.metrics_port),
                    "--metrics-bind",
                    "127.0.0.1",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Until its metrics port answers. A port another process took between free_port() and the
        worker's bind (other tests run alongside) is one clear exit: start again on another port."""
        deadline = time.monotonic() + timeout_s
        relaunches = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if relaunches < 3 and "Address already in use" in self.log_tail():
                    relaunches += 1
                    self.proc = self._launch()
                    continue
                raise RuntimeError(f"worker exited with {self.proc.returncode}\n{self.log_tail()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.metrics_port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"worker metrics port not open after {timeout_s} s\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def owns(self, job: dict[str, Any]) -> bool:
        # worker ids are "<hostname>:<pid>:<kinds>:<random>" (worker/runner.py)
        return f":{self.pid}:" in (job.get("worker_id") or "")

    def inference_pid(self) -> int | None:
        """The pid of its inference process once it has started one (infer/host.py logs it)."""
        found = re.search(r"inference process (\d+) started", self.log_path.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        return f"--- worker {self.pid} ---\n" + "\n".join(lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _quick_rules(path: Path) -> Path:
    """config/rules.yaml with a 1 s quiet period (5 s there): the test waits less, the rules are the same."""
    rules = yaml.safe_load(checkout_file("config/rules.yaml").read_text())
    for rule in rules["rules"]:
        rule["action"]["quiet_period_s"] = 1
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@contextmanager
def _cluster(
    tmp_path: Path, database_url: str, pacs_port: int
) -> Iterator[tuple[list[NodeProcess], list[WorkerProcess]]]:
    extra: dict[str, Any] = {
        "spool_dir": str(tmp_path / "shared-spool"),
        "rules_file": str(_quick_rules(tmp_path / "rules.yaml")),
        "worker": WORKER_SETTINGS,
        # As in the cluster: the schema is migrated once (the fixture did), and no process alters it.
        "auto_upgrade_schema": False,
    }
    receivers = [
        NodeProcess(
            tmp_path / f"receiver-{name}",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            database_url=database_url,
            quiet_period_s=1,
            serve_args=("--no-workers",),
            pacs_verify=False,  # storescp has no C-FIND
            extra=extra,
            api_user=f"test-admin-{name}",  # each creates its own API account: no race on one user name
        )
        for name in ("a", "b")
    ]
    with ExitStack() as stack:
        for receiver in receivers:
            stack.callback(receiver.stop)
        workers: list[WorkerProcess] = []
        # Workers start elsewhere, with their own copy of the configuration; everything starts at once.
        for n in (1, 2):
            config = tmp_path / f"worker-{n}.yaml"
            config.write_bytes(receivers[0].config_path.read_bytes())
            worker = WorkerProcess(config, tmp_path / f"worker-{n}.log")
            stack.callback(worker.stop)
            workers.append(worker)
        with ThreadPoolExecutor(len(receivers)) as pool:
            for started in [pool.submit(r.start, 120) for r in receivers]:
                started.result()
        for worker in workers:
            worker.wait_ready()
        yield receivers, workers


def test_two_receivers_two_workers_one_postgresql_and_a_killed_worker(
    tmp_path: Path, postgres_database: str
) -> None:
    received = tmp_path / "pacs"
    # Two studies (new UIDs each time) of 24 slices: enough for the chest CT rule (20 or more).
    ct_a = lung_ct_series(tmp_path / "ct-a", "lung1", frames=slice(12, 36))
    ct_b = lung_ct_series(tmp_path / "ct-b", "lung1", frames=slice(12, 36))
    with (
        storescp(received) as pacs_port,
        _cluster(tmp_path, postgres_database, pacs_port) as (receivers, workers),
    ):
        receiver_a, receiver_b = receivers

        def logs() -> str:
            return "\n".join(
                [receiver_a.log_tail(20), receiver_b.log_tail(20), *(w.log_tail() for w in workers)]
            )

        storescu(list(ct_a.paths), receiver_a.ae_title, receiver_a.dicom_port)
        storescu(list(ct_b.paths), receiver_b.ae_title, receiver_b.dicom_port)

        def running_infer() -> dict[str, Any] | None:
            return next((j for j in receiver_a.jobs(kind="infer") if j["status"] == "running"), None)

        victim_job = _wait(running_infer, 90, "an infer job to run", logs)
        (victim,) = [w for w in workers if w.owns(victim_job)]
        (survivor,) = [w for w in workers if w is not victim]
        # In the middle of the job: its inference process has started on the series.
        model_process = _wait(victim.inference_pid, 90, "the victim's inference process", logs)
        os.kill(victim.pid, signal.SIGKILL)  # no goodbye: its lease is left to expire
        victim.proc.wait()
        # The model's process dies with its worker (PR_SET_PDEATHSIG): no orphan holds CPU, GPU or memory.
        _wait(lambda: not _alive(model_process), 30, f"inference process {model_process} to end", logs)

        def all_done() -> list[dict[str, Any]] | None:
            jobs = receiver_b.jobs()
            done = len(jobs) == 4 and all(j["status"] == "succeeded" for j in jobs)
            return jobs if done else None

        jobs = _wait(all_done, 120, "2 infer + 2 deliver jobs to succeed", logs)

        # The killed worker's job: claimed once by it, once more by the survivor after the lease expired.
        retried = next(j for j in jobs if j["id"] == victim_job["id"])
        assert retried["attempts"] == 2 and survivor.owns(retried), retried
        # Every job ran in a worker process, none in a receiver; every other job ran once.
        assert all(any(w.owns(j) for w in workers) for j in jobs), [j["worker_id"] for j in jobs]
        assert [j["attempts"] for j in jobs if j["id"] != retried["id"]] == [1, 1, 1]
        # Both studies are in the one database, whichever receiver took them: nothing acknowledged lost.
        for ct in (ct_a, ct_b):
            infer = [
                j for j in jobs if j["kind"] == "infer" and j["series_instance_uid"] == ct.series_instance_uid
            ]
            assert len(infer) == 1, infer  # one job per series and model
            for receiver in receivers:
                series = receiver.get_json(f"/api/series/{ct.series_instance_uid}")
                assert series["instance_count"] == len(ct.paths)
        assert 'ainode_jobs_finished_total{kind="infer",status="succeeded"}' in survivor.metrics()
        spooled = sorted((tmp_path / "shared-spool" / "instances").rglob("*.dcm"))
        assert len(spooled) == len(ct_a.paths) + len(ct_b.paths)

    _assert_one_seg_and_sr_per_series(postgres_database, received, [ct_a, ct_b])


def _assert_one_seg_and_sr_per_series(database_url: str, received: Path, sources: list[SeriesInfo]) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(results.c.source_series_instance_uid, results.c.kind, sa.func.count())
                .group_by(results.c.source_series_instance_uid, results.c.kind)
                .order_by(results.c.source_series_instance_uid, results.c.kind)
            ).all()
    finally:
        engine.dispose()
    expected = sorted((s.series_instance_uid, kind, 1) for s in sources for kind in ("SEG", "SR"))
    assert sorted(tuple(r) for r in rows) == expected
    # At the destination: one SEG and one SR for each source series, no second result series.
    delivered = [dcmread(f, stop_before_pixels=True) for f in received.iterdir()]
    by_modality = sorted(ds.Modality for ds in delivered)
    assert by_modality == ["SEG", "SEG", "SR", "SR"], by_modality
    segs = [ds for ds in delivered if ds.Modality == "SEG"]
    referenced = {ds.ReferencedSeriesSequence[0].SeriesInstanceUID for ds in segs}
    assert referenced == {s.series_instance_uid for s in sources}
    assert len({ds.SeriesInstanceUID for ds in delivered}) == 4
