"""Ingest benchmark: C-STORE into the node, each receive option vs DCMTK storescp in the same run.

Same sender (DCMTK storescu, TCP_NODELAY=1), same N CT instances of 512 x 512 (~0.5 MB) over loopback, for
1 association and for 4 parallel associations (4 storescu processes, N/4 instances each), with the node's
durability on (fsync) and off (the receiver run under eatmydata, which turns fsync into a no-op: the
cost of the durable write, measured). The reference is DCMTK storescp (--fork: one process per
association; it never fsyncs), measured in the same run, interleaved with the options. Options:

  a  the node today: `serve --no-workers`, dicom.receiver pynetdicom (fsync file + dir + SQLite commit
     per instance, before Success)
  b  prototype, group commit: the same pynetdicom SCP, but instances waiting in any association share one
     SQLite transaction and one fsync per spool directory (a committer thread; the handler waits for it)
  c  prototype, SO_REUSEPORT: two receiving processes (the node's pynetdicom SCP) on one port, one
     SQLite database and spool (4 associations only: one association lands on one process)
  d  the native edge: `serve --no-workers`, dicom.receiver dcmtk (native/ainode-storescp): Success after
     fsync file + rename + fsync landing dir; rows committed in batches off the ack path. Two rates:
     acknowledged (what the sender sees) and indexed (until the last row is in the database)

    .venv/bin/python benchmarks/ingest.py [--instances 300] [--repeat 3] [--options a,b,c,d]
        [--associations 1,4] [--fsync on,off] [--profile DIR]

`--profile DIR` records option a (one association, fsync on) with py-spy (pip install py-spy) and prints
the functions with the most samples. The table reports the load average before and after: on a shared
machine, compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path, where benchmarks/queue.py would stand in for the
# standard library's queue (imported by urllib3, pydicom, ...).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import yaml  # noqa: E402

from dicom_ai_node.devtools.dcmtk import DCMTK_ENV, dcmtk_tool  # noqa: E402
from dicom_ai_node.devtools.node import NodeProcess  # noqa: E402
from dicom_ai_node.devtools.ports import free_port, wait_port  # noqa: E402
from dicom_ai_node.devtools.synthetic import write_ct_series  # noqa: E402

EATMYDATA = Path("/usr/lib/x86_64-linux-gnu/libeatmydata.so")
OPTIONS = {
    "a": "the node today (pynetdicom, fsync + SQLite commit per instance)",
    "b": "prototype: group commit (pynetdicom, one transaction + one dir fsync per batch)",
    "c": "prototype: 2 processes on one port (SO_REUSEPORT, pynetdicom)",
    "d": "native edge (dcmtk, rows indexed in batches)",
}


# -- senders ---------------------------------------------------------------------------------------------
def split_series(files_dir: Path, parts: int) -> list[Path]:
    """The instances in `parts` folders (one per association), hard links into the originals."""
    files = sorted(files_dir.iterdir())
    folders = []
    for i in range(parts):
        folder = files_dir.parent / f"{files_dir.name}-part{parts}-{i}"
        if not folder.exists():
            folder.mkdir()
            for path in files[i::parts]:
                os.link(path, folder / path.name)
        folders.append(folder)
    return folders


def send(folders: list[Path], port: int, called: str) -> float:
    """Seconds until every storescu (one association per folder, in parallel) has finished."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                dcmtk_tool("storescu"),
                "-aet",
                "STORESCU",
                "-aec",
                called,
                "+sd",
                "-nh",
                "127.0.0.1",
                str(port),
                str(f),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for f in folders
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    elapsed = time.perf_counter() - t0
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")
    return elapsed


@contextlib.contextmanager
def preloaded(fsync: bool) -> Iterator[None]:
    """Processes started inside run with fsync a no-op (eatmydata) when `fsync` is False."""
    if fsync:
        yield
        return
    old = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = str(EATMYDATA)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = old


# -- receivers -------------------------------------------------------------------------------------------
@dataclass
class Run:
    acked_s: float
    indexed_s: float


def bench_storescp(folders: list[Path], work: Path) -> Run:
    out = work / "storescp-out"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk_tool("storescp"), "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port)
        elapsed = send(folders, port, "STORESCP")
        return Run(elapsed, elapsed)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the parent and any forked child
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def _count_rows(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            return int(conn.execute("select count(*) from instances").fetchone()[0])
    except sqlite3.Error:
        return -1


def _wait_rows(db: Path, n: int, t0: float, timeout_s: float = 300) -> float:
    while time.perf_counter() - t0 < timeout_s:
        if _count_rows(db) >= n:
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise TimeoutError(f"{n} rows not indexed in {timeout_s} s")


def bench_node(folders: list[Path], work: Path, n: int, receiver: str, profile: Path | None = None) -> Run:
    port = free_port()
    dicom = {
        "bind": "127.0.0.1",
        "port": port,
        "receiver": receiver,
        "allowed_peers": [{"ae_title": "NOPACS", "hosts": ["127.0.0.1"]}, {"ae_title": "STORESCU"}],
    }
    node = NodeProcess(
        work / "node",
        pacs_aet="NOPACS",
        pacs_port=free_port(),
        dicom_port=port,
        extra={"dicom": dicom, "quiet_period_s": 600},
        serve_args=("--no-workers",),
    )
    node.start()
    recorder = None
    try:
        if profile is not None and node.proc is not None:
            recorder = start_profile(node.proc.pid, profile)
        t0 = time.perf_counter()
        try:
            acked = send(folders, port, node.ae_title)
        except RuntimeError:
            print(f"node ({receiver}) log tail:\n{node.log_tail(30)}", file=sys.stderr)
            raise
        indexed = _wait_rows(work / "node" / "node.db", n, t0)
        return Run(acked, indexed)
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=60)
        node.stop()
        shutil.rmtree(work / "node", ignore_errors=True)


PROTOTYPE_CONFIG = "prototype.yaml"


def bench_prototype(folders: list[Path], work: Path, n: int, kind: str, processes: int) -> Run:
    """Options b and c: receiving processes of this script (`--serve-prototype`) on one port."""
    root = work / "proto"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "ae_title": "AINODE",
        "dicom": {"bind": "127.0.0.1", "port": port, "allowed_peers": [{"ae_title": "STORESCU"}]},
        "spool_dir": str(root / "spool"),
        "database_url": f"sqlite:///{root / 'node.db'}",
        "disk_reserve_mb": 100,
        "rules_file": str(root / "no-rules.yaml"),
    }
    (root / PROTOTYPE_CONFIG).write_text(yaml.safe_dump(config))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):  # one after the other: the first creates the database schema
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--serve-prototype", kind, str(root / PROTOTYPE_CONFIG)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            assert procs[-1].stdout is not None
            line = procs[-1].stdout.readline().decode()
            if not line.startswith("listening"):
                raise RuntimeError(
                    f"prototype {kind} did not start: {line}{procs[-1].stdout.read().decode()[-3000:]}"
                )
        t0 = time.perf_counter()
        acked = send(folders, port, "AINODE")
        return Run(acked, _wait_rows(root / "node.db", n, t0))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


# -- prototypes b and c: the node's pynetdicom SCP with another store step ---------------------------------
def serve_prototype(kind: str, config_path: Path) -> None:
    """Run the node's StorageSCP until SIGTERM: `group` with the group-commit store step, `reuseport`
    unchanged but on a listener with SO_REUSEPORT (several processes on one port)."""
    from dicom_ai_node.config import load_settings
    from dicom_ai_node.node import build_services
    from dicom_ai_node.receive import scp
    from dicom_ai_node.receive.server import NodeAssociationServer

    settings = load_settings(config_path)
    services = build_services(settings, migrate="upgrade")
    bind = NodeAssociationServer.server_bind

    def server_bind_reuse_port(server: Any) -> None:  # pynetdicom's server_bind ignores allow_reuse_port
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bind(server)

    setattr(NodeAssociationServer, "server_bind", server_bind_reuse_port)  # noqa: B010 - bench-only patch
    if kind == "group":
        committer = GroupCommitter(services)
        setattr(scp, "_store", committer.store)  # noqa: B010 - bench-only: the store step under test
    receiver = scp.StorageSCP(settings, services.spool, services.repo)
    receiver.start()
    print("listening", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    receiver.stop()


@dataclass
class _Waiting:
    record: Any
    relative: str
    done: threading.Event = field(default_factory=threading.Event)
    is_new: bool = False


class GroupCommitter:
    """Prototype b: each C-STORE handler checks its file, fsyncs and renames it, then waits; one thread
    takes every instance waiting (from any association), fsyncs each spool directory they landed in once,
    records them in one transaction (SeriesRepository.record_instances) and wakes them."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.lock = threading.Condition()
        self.waiting: list[_Waiting] = []
        threading.Thread(target=self._run, daemon=True).start()

    def store(self, event: Any, ctx: Any) -> Any:
        from dicom_ai_node.domain.ingest import IngestResult
        from dicom_ai_node.receive.header import UnreadableDataset, read_header
        from dicom_ai_node.receive.ingest import Refused, StoreRequest, check_instance, instance_record

        path = Path(event.dataset_path)
        request = StoreRequest(
            str(event.request.AffectedSOPClassUID),
            str(event.request.AffectedSOPInstanceUID),
            str(event.context.abstract_syntax),
        )
        try:
            header = read_header(path)
            check_instance(header, request)
        except (UnreadableDataset, Refused) as exc:
            path.unlink(missing_ok=True)
            return IngestResult(exc.status, "", "", exc.reason, stored=False)
        spool = self.services.spool
        name = os.urandom(16).hex()
        relative = f"instances/{name[:2]}/{name}.dcm"
        target = spool.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(path, target)
        calling = str(event.assoc.requestor.ae_title).strip()
        item = _Waiting(instance_record(header, relative, target.stat().st_size, calling), relative)
        with self.lock:
            self.waiting.append(item)
            self.lock.notify()
        item.done.wait()
        uids = header.uids
        return IngestResult(0, uids["SOPClassUID"], uids["SOPInstanceUID"], "stored", stored=True)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.waiting:
                    self.lock.wait()
                batch, self.waiting = self.waiting, []
            for directory in {(self.services.spool.root / item.relative).parent for item in batch}:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(fd)
                os.close(fd)
            added = self.services.repo.record_instances([item.record for item in batch])
            for item, is_new in zip(batch, added, strict=True):
                item.is_new = is_new
                item.done.set()


# -- profile ---------------------------------------------------------------------------------------------
def start_profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(py_spy), "record", "--pid", str(pid), "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    return proc


def profile_table(raw: Path, top: int = 14) -> list[str]:
    """Self and inclusive shares of the busiest functions (samples of non-idle threads)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")[1:]]
        n = int(count)
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples of busy threads", "| function | self | inclusive |", "|---|---|---|"]
    shown = [f for f, _ in own.most_common(top)]
    for name in (
        "handle_store",
        "read_header",
        "record_instance",
        "commit_file",
        "run_reactor",
        "_read_pdu_data",
    ):
        shown += [f for f in inclusive if f.startswith(name) and f not in shown][:1]
    for f in shown:
        lines.append(f"| {f} | {own[f] / total:.1%} | {inclusive[f] / total:.1%} |")
    return lines


# -- main ------------------------------------------------------------------------------------------------
def run_option(option: str, folders: list[Path], work: Path, n: int, fsync: bool) -> Run:
    with preloaded(fsync):
        if option == "a":
            return bench_node(folders, work, n, "pynetdicom")
        if option == "b":
            return bench_prototype(folders, work, n, "group", 1)
        if option == "c":
            return bench_prototype(folders, work, n, "reuseport", 2)
        return bench_node(folders, work, n, "dcmtk")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--options", default="a,b,c,d")
    ap.add_argument("--associations", default="1,4")
    ap.add_argument("--fsync", default="on,off")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--serve-prototype", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_prototype:
        serve_prototype(args.serve_prototype[0], Path(args.serve_prototype[1]))
        return
    options = args.options.split(",")
    associations = [int(a) for a in args.associations.split(",")]
    fsyncs = [f == "on" for f in args.fsync.split(",")]
    if False in fsyncs and not EATMYDATA.exists():
        raise SystemExit("fsync off needs eatmydata: apt-get install eatmydata (or --fsync on)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files_dir = work / "ct"
        write_ct_series(files_dir, n_slices=args.instances, rows=512, cols=512)
        n = args.instances
        size_mb = sum(f.stat().st_size for f in files_dir.iterdir()) / 1e6
        profile_lines: list[str] = []
        if args.profile is not None:
            raw = args.profile / "node-receive.txt"
            bench_node([files_dir], work, n, "pynetdicom", profile=raw)
            profile_lines = profile_table(raw)
        ref: dict[int, list[float]] = {a: [] for a in associations}
        runs: dict[tuple[str, int, bool], list[Run]] = collections.defaultdict(list)
        failures: collections.Counter[tuple[str, int, bool]] = collections.Counter()
        for _ in range(args.repeat):
            for assoc in associations:
                folders = [files_dir] if assoc == 1 else split_series(files_dir, assoc)
                ref[assoc].append(bench_storescp(folders, work).acked_s)
                for option in options:
                    if option == "c" and assoc == 1:
                        continue
                    for fsync in fsyncs:
                        try:
                            runs[(option, assoc, fsync)].append(run_option(option, folders, work, n, fsync))
                        except (RuntimeError, TimeoutError) as exc:
                            # A sender that failed: shown in the table, the other runs go on.
                            failures[(option, assoc, fsync)] += 1
                            print(f"{option}/{assoc}/{fsync}: {str(exc)[:300]}", file=sys.stderr)
    load_after = os.getloadavg()
    print(
        f"ingest: {n} CT instances 512x512 ({size_mb:.0f} MB), storescu TCP_NODELAY=1, loopback, median of "
        f"{args.repeat}; {os.cpu_count()} cores, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(
        "| receiver | associations | fsync | inst/s acknowledged | inst/s indexed | storescp inst/s | ratio (acked) |"
    )
    print("|---|---|---|---|---|---|---|")
    for assoc in associations:
        r_ref = n / statistics.median(ref[assoc])
        print(
            f"| DCMTK storescp --fork (never fsyncs) | {assoc} | - | {r_ref:.0f} | - | {r_ref:.0f} | 1.00 |"
        )
        for option in options:
            for fsync in fsyncs:
                got = runs.get((option, assoc, fsync))
                failed = failures[(option, assoc, fsync)]
                note = f" ({failed} of {failed + len(got or [])} runs failed)" if failed else ""
                if not got:
                    if failed:
                        print(
                            f"| {option}: {OPTIONS[option]}{note} | {assoc} | {'on' if fsync else 'off'} | - | - | - | - |"
                        )
                    continue
                acked = n / statistics.median(r.acked_s for r in got)
                indexed = n / statistics.median(r.indexed_s for r in got)
                print(
                    f"| {option}: {OPTIONS[option]}{note} | {assoc} | {'on' if fsync else 'off'} | {acked:.0f} | "
                    f"{indexed:.0f} | {r_ref:.0f} | {acked / r_ref:.2f} |"
                )
    if profile_lines:
        print()
        print("profile, option a, 1 association, fsync on (py-spy, busy threads):")
        print("\n".join(profile_lines))


if __name__ == "__main__":
    main()
