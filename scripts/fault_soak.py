"""The longer run of tests/e2e/test_faults_kill9.py: kill -9 the node at random moments under parallel
senders, round after round, then check that nothing it acknowledged was lost (docs/reliability.md,
"Faults").

Each round gives every sender a new synthetic CT series (two senders share each study) and kills the node
once, at a random moment: after a random number of acknowledged instances (+0-20 ms), or, for
`--late-kill-fraction` of the rounds, 0-`--late-kill-max-s` s after the round's last instance (routing,
inference or delivery under way). The node restarts at once each time; the senders re-send what got no
Success. After the last round every series must be complete and processed, and the spool and database
must agree byte for byte with what was acknowledged.

    .venv/bin/python scripts/fault_soak.py --rounds 20 --senders 4 --instances-per-series 24 [--seed 1]

Needs DCMTK's storescp (the destination). Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_ai_node.devtools.dcmtk import storescp  # noqa: E402
from dicom_ai_node.devtools.node import NodeProcess  # noqa: E402
from dicom_ai_node.devtools.ports import free_port  # noqa: E402
from tests.support.faults import (  # noqa: E402
    KillFigures,
    fault_rules_file,
    node_extra,
    plan_batches,
    run_kill_rounds,
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20, help="kills (one per round)")
    parser.add_argument("--senders", type=int, default=4, help="parallel senders, each its own association")
    parser.add_argument("--instances-per-series", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    parser.add_argument("--late-kill-fraction", type=float, default=0.25)
    parser.add_argument("--late-kill-max-s", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, help="keep the node's spool, database and log here")
    return parser.parse_args()


def _removed_at_restart(log_text: str) -> int:
    """Orphan spool files the node removed at its starts (cli.serve logs each sweep that found some)."""
    total = 0
    for line in log_text.splitlines():
        if "unacknowledged spool files that no instance row names" in line:
            total += int(line.split("removed ", 1)[1].split()[0])
    return total


def _report(args: argparse.Namespace, figures: KillFigures, log_text: str, wall_s: float) -> bool:
    c, sent = figures.consistency, figures.send_log
    statuses = Counter(j.status for j in figures.jobs)
    reruns = sum(1 for j in figures.jobs if j.kind == "infer" and j.attempts > 1)
    processed = figures.series - len(figures.unprocessed)
    while_sending = sum(r.while_sending for r in figures.rounds)
    rows = [
        ("rounds (kill -9 + restart)", f"{len(figures.rounds)} ({while_sending} while sending)"),
        ("senders x instances per series", f"{args.senders} x {args.instances_per_series}"),
        ("series", figures.series),
        ("instances", figures.instances),
        ("C-STOREs sent", sent.attempts),
        ("  answered Success", sum(o.answers.count(0) for o in sent.outcomes.values())),
        ("  cut off by a kill (no answer)", sent.unanswered),
        ("  refused (failure status)", len(sent.refusals)),
        ("instances acknowledged", figures.acknowledged),
        ("acknowledged missing", len(c.missing) + len(c.missing_files)),
        ("acknowledged corrupt (bytes differ)", len(c.corrupt)),
        ("rows without file", len(c.rows_without_file)),
        ("files without row (orphans)", len(c.files_without_row)),
        ("left in spool/incoming", len(c.incoming)),
        ("series count != instance rows", len(c.count_mismatch)),
        ("orphans removed at restarts", _removed_at_restart(log_text)),
        ("series processed (latest generation)", f"{processed} / {figures.series}"),
        ("jobs", ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))),
        ("infer jobs re-run after a kill", reruns),
        ("restart (node up again), s", _spread([r.restart_s for r in figures.rounds])),
        ("last restart -> all processed, s", figures.recovery_s),
        ("wall time, s", round(wall_s)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'figure':<{width}} | value")
    print(f"{'-' * width}-|-{'-' * 24}")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    print("\nround | queued | kill after ack # (+delay s) | acknowledged at kill | restart s")
    for r in figures.rounds:
        print(
            f"{r.index:5} | {r.queued:6} | {r.kill_after_ack:>13} (+{r.delay_s:.3f}) | "
            f"{r.acknowledged_at_kill:20} | {r.restart_s}"
        )
    ok = (
        c.ok
        and not figures.unprocessed
        and set(statuses) == {"succeeded"}
        and figures.acknowledged == figures.instances
        and not sent.refusals
    )
    if figures.unprocessed:
        print("\nnot processed:", figures.unprocessed)
    print("\nresult:", "PASS" if ok else "FAIL")
    return ok


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2]:.1f}, max {ordered[-1]:.1f}"


def main() -> int:
    args = _arguments()
    # The senders retry while the node is down: pynetdicom logs each refused connection as an error.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fault-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    calling_aes = [f"MODALITY{i + 1}" for i in range(args.senders)]
    started = time.monotonic()
    plan = plan_batches(
        workdir / "sent",
        batches=args.rounds,
        senders=args.senders,
        instances_per_series=args.instances_per_series,
    )
    rules = fault_rules_file(workdir / "rules.yaml", args.instances_per_series)
    port = free_port()
    try:
        with storescp(workdir / "pacs") as pacs_port:
            node = NodeProcess(
                workdir / "node",
                pacs_aet="PACS",
                pacs_port=pacs_port,
                dicom_port=port,
                quiet_period_s=1,
                pacs_verify=False,
                extra=node_extra(
                    rules_file=rules,
                    dicom_port=port,
                    pacs_port=pacs_port,
                    calling_aes=calling_aes,
                    max_associations_per_ip=2 * args.senders + 8,
                ),
            )
            try:
                node.start()
                figures = run_kill_rounds(
                    node,
                    plan,
                    calling_aes,
                    random.Random(args.seed),
                    late_kill_fraction=args.late_kill_fraction,
                    late_kill_max_s=args.late_kill_max_s,
                    process_timeout_s=max(120, 10 * args.rounds),
                )
            finally:
                node.stop()
        ok = _report(args, figures, node.log_path.read_text(errors="replace"), time.monotonic() - started)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
