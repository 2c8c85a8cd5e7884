"""Memory: peak RSS of the whole path for a 600-slice 512 x 512 CT, and of receiving 1 vs 10 studies at once.

Path: DCMTK storescu -> the node (`dicom-ai-node serve`, SQLite, workers on) -> completion -> load series ->
inference child (dicom_ai_node/infer/host.py; `--model`, default the trained ct-lung UNet) -> SEG + SR ->
deliver (C-STORE to a DCMTK storescp). The CT is synthetic (devtools/synthetic.py write_ct_series: 600 x 512
x 512, 0.7 mm pixels, 0.8 mm slices, 315 MB). Every process of the node's tree (the node, its inference
child, multiprocessing's resource tracker) is sampled every 0.05 s from /proc/<pid>/status and its own peak
is the kernel's VmHWM (exact, not sampled). Reported:

- per process: peak RSS (VmHWM), and the sum of those peaks: the issue's measure (it adds peaks that happen
  at different times, and counts the volume in /dev/shm in both processes once each maps it);
- "path, at once": the sampled peak of anonymous + file-backed resident memory of all processes plus the
  node's transfer files in /dev/shm, counted once (what the machine needs at that moment);
- the same peaks per stage (receive, load, inference, encode, deliver), from the node's own timestamps.

Receive: a receive-only node (`serve --no-workers`) takes N studies at once (N parallel storescu, one
association each, `--receive-slices` slices of 512 x 512 per study); its peak RSS (VmHWM) above its idle
RSS should not grow with N. A fresh node per N.

    .venv/bin/python benchmarks/memory.py [--slices 600] [--model ct-lung] [--studies 1,10]
        [--receive-slices 60] [--skip-path] [--skip-receive] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.infer.transfer import TRANSFER_PREFIX

MB = 1024 * 1024
SHM = Path("/dev/shm")


def proc_status(pid: int) -> dict[str, int]:
    """Memory lines of /proc/<pid>/status in bytes (VmHWM, VmRSS, RssAnon, RssFile, RssShmem)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from the parent pid in /proc/<pid>/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: the parent pid follows the last ")".
        parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


def role(pid: int, root: int) -> str:
    if pid == root:
        return "node"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if "spawn_main" in cmdline:
        return "inference child"
    return cmdline[:40]


def shm_bytes(node_pid: int) -> int:
    """Allocated size of the node's transfer files in /dev/shm (volumes and label maps in flight)."""
    total = 0
    for path in SHM.glob(f"{TRANSFER_PREFIX}{node_pid}-*"):
        try:
            total += path.stat().st_blocks * 512
        except OSError:
            pass
    return total


@dataclass
class Sample:
    t: float
    rss: dict[str, int]  # role -> VmRSS
    at_once: int  # anon + file-backed resident of all processes + transfer files counted once


@dataclass
class TreeSampler:
    """Samples the node's process tree in a thread; keeps each process's VmHWM (peak) by role."""

    root: int
    interval_s: float = 0.05
    samples: list[Sample] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()  # the last VmHWM of every process still alive

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        t = time.time()
        rss: dict[str, int] = {}
        at_once = shm_bytes(self.root)
        for pid in process_tree(self.root):
            try:
                status = proc_status(pid)
            except OSError:
                continue  # exited meanwhile
            name = role(pid, self.root)
            rss[name] = rss.get(name, 0) + status["VmRSS"]
            at_once += status.get("RssAnon", 0) + status.get("RssFile", 0)
            self.peaks[name] = max(self.peaks.get(name, 0), status["VmHWM"])
        self.samples.append(Sample(t, rss, at_once))

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def write_rules(path: Path, model: str) -> Path:
    """Every CT to `model`, delivered to `pacs`, complete 1 s after its last instance."""
    rule = {
        "id": "memory-benchmark",
        "version": 1,
        "description": f"every CT -> {model}",
        "conditions": [{"attribute": "Modality", "equals": "CT"}],
        "action": {"model": model, "destinations": ["pacs"], "priority": 5, "quiet_period_s": 1},
    }
    path.write_text(yaml.safe_dump({"rules": [rule]}, sort_keys=False))
    return path


def ct_series(directory: Path, slices: int) -> list[Path]:
    """The synthetic CT, reused when `directory` already holds it."""
    existing = sorted(directory.glob("*.dcm"))
    if len(existing) == slices:
        return existing
    return write_ct_series(directory, slices, 512, 512, pixel_spacing=(0.7, 0.7), slice_thickness=0.8)


def wait_for_jobs(
    node: NodeProcess, series_uid: str, timeout_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The infer and deliver jobs of the series once the deliver job has finished."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        jobs = [j for j in node.jobs(limit=50) if j["payload"].get("series_instance_uid") == series_uid]
        infer = next((j for j in jobs if j["kind"] == "infer"), None)
        deliver = next((j for j in jobs if j["kind"] == "deliver"), None)
        if infer is not None and infer["status"] in ("failed", "dead"):
            raise RuntimeError(f"infer job failed: {infer.get('last_error')}\n{node.log_tail()}")
        if infer is not None and deliver is not None and deliver["finished_at"]:
            return infer, deliver
        time.sleep(0.5)
    raise TimeoutError(f"no results after {timeout_s} s\n{node.log_tail()}")


def measure_path(work: Path, paths: list[Path], model: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    rules = write_rules(work / "rules.yaml", model)
    with storescp(work / "pacs", aet="PACS") as pacs_port:
        node = NodeProcess(
            work / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            pacs_verify=False,  # a bare storescp has no C-FIND
            quiet_period_s=1,
            extra={"rules_file": str(rules), "models": {"device": "cpu"}},
        )
        node.start(timeout_s=180)
        try:
            assert node.proc is not None
            sampler = TreeSampler(node.proc.pid).start()
            time.sleep(2)
            idle = proc_status(node.proc.pid)["VmRSS"]
            load = os.getloadavg()[0]
            t_send = time.time()
            storescu(paths, node.ae_title, node.dicom_port)
            t_sent = time.time()
            series_uid = _series_uid(paths[0])
            infer, deliver = wait_for_jobs(node, series_uid, timeout_s=3600)
            time.sleep(1)
            sampler.stop()
            series = node.get_json(f"/api/series/{series_uid}")
        finally:
            node.stop()
    t = infer["result"]["timings"]
    started = ts(infer["started_at"])
    stages = {
        "receive (storescu, 600 C-STOREs)": (t_send, t_sent),
        "completion + queue": (ts(series["last_received_at"]), started),
        "load series": (started, started + t["load_s"]),
        "inference (share, child, labels back)": (
            started + t["load_s"],
            started + t["load_s"] + t["infer_s"],
        ),
        "encode SEG + SR": (
            started + t["load_s"] + t["infer_s"],
            started + t["load_s"] + t["infer_s"] + t["encode_s"],
        ),
        "deliver (C-STORE to storescp)": (ts(deliver["started_at"]), ts(deliver["finished_at"])),
    }
    roles = [r for r in ("node", "inference child") if r in sampler.peaks]
    others = [r for r in sampler.peaks if r not in roles]
    print(
        f"\nwhole path, {len(paths)} x 512 x 512 CT, model {model} ({infer['result'].get('device', '?')}), "
        f"load average {load:.1f} at the start, {len(os.sched_getaffinity(0))} CPUs; node idle RSS "
        f"{idle / MB:.0f} MB; timings s: load {t['load_s']:.1f}, inference {t['infer_s']:.1f}, "
        f"encode {t['encode_s']:.1f}"
    )
    print("| process | peak RSS (VmHWM) MB |\n|---|---|")
    for name in roles + others:
        print(f"| {name} | {sampler.peaks[name] / MB:.0f} |")
    print(f"| **sum of the per-process peaks** | **{sum(sampler.peaks.values()) / MB:.0f}** |")
    at_once = max(s.at_once for s in sampler.samples)
    print(
        f"| path, at once (sampled: anon + file-backed of all, /dev/shm counted once) | {at_once / MB:.0f} |"
    )
    print("\n| stage | s | node RSS peak MB | inference child RSS peak MB | path at once, peak MB |")
    print("|---|---|---|---|---|")
    for name, (start, end) in stages.items():
        window = sampler.window(start, end) or [min(sampler.samples, key=lambda s: abs(s.t - end))]
        node_peak = max(s.rss.get("node", 0) for s in window)
        child_peak = max(s.rss.get("inference child", 0) for s in window)
        print(
            f"| {name} | {end - start:.1f} | {node_peak / MB:.0f} | {child_peak / MB:.0f} "
            f"| {max(s.at_once for s in window) / MB:.0f} |"
        )


def _series_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def measure_receive(work: Path, studies: list[list[Path]]) -> tuple[int, int, int, float, float]:
    """(idle RSS, peak RSS, sampled peak at once, seconds, load) of a receive-only node taking `studies` at once."""
    node = NodeProcess(work, pacs_aet="PACS", pacs_port=1, pacs_verify=False, serve_args=("--no-workers",))
    config = yaml.safe_load(node.config_path.read_text())
    # One association per study, all from 127.0.0.1 and AE STORESCU: lift the per-peer caps above N.
    config["dicom"].update(max_associations_per_ip=len(studies) + 2, max_associations_per_ae=len(studies) + 2)
    node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    node.start(timeout_s=180)
    try:
        assert node.proc is not None
        sampler = TreeSampler(node.proc.pid).start()
        time.sleep(2)
        idle = proc_status(node.proc.pid)["VmRSS"]
        load = os.getloadavg()[0]
        t = time.time()
        with ThreadPoolExecutor(len(studies)) as pool:
            list(pool.map(lambda paths: storescu(paths, node.ae_title, node.dicom_port), studies))
        seconds = time.time() - t
        time.sleep(1)
        sampler.stop()
    finally:
        node.stop()
    return idle, sampler.peaks["node"], max(s.at_once for s in sampler.samples), seconds, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=600)
    ap.add_argument("--model", default="ct-lung", help="ct-lung (UNet) or ct-lung-classical")
    ap.add_argument("--studies", default="1,10", help="concurrent studies for the receive measurement")
    ap.add_argument("--receive-slices", type=int, default=60)
    ap.add_argument("--skip-path", action="store_true")
    ap.add_argument("--skip-receive", action="store_true")
    ap.add_argument("--data", type=Path, default=None, help="keep the written series here (reused)")
    args = ap.parse_args()
    counts = [int(n) for n in args.studies.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if not args.skip_path:
            paths = ct_series(data / f"ct{args.slices}", args.slices)
            measure_path(Path(tmp) / "path", paths, args.model)
        if not args.skip_receive:
            series = [ct_series(data / f"study{i}", args.receive_slices) for i in range(max(counts))]
            mb = sum(p.stat().st_size for p in series[0]) / 1e6
            print(
                f"\nreceive-only node (serve --no-workers), {args.receive_slices} x 512 x 512 per study "
                f"({mb:.0f} MB), one storescu association per study"
            )
            print(
                "| studies at once | instances | s | node idle RSS MB | node peak RSS MB | peak above idle MB "
                "| load avg (1 min) |"
            )
            print("|---|---|---|---|---|---|---|")
            for n in counts:
                idle, peak, _, seconds, load = measure_receive(Path(tmp) / f"receive{n}", series[:n])
                print(
                    f"| {n} | {n * args.receive_slices} | {seconds:.1f} | {idle / MB:.0f} | {peak / MB:.0f} "
                    f"| {(peak - idle) / MB:.0f} | {load:.1f} |"
                )
                print(f"measured receive of {n} studies", file=sys.stderr)


if __name__ == "__main__":
    main()
