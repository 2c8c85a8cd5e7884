"""atheris (libFuzzer) harness over the receive parse path: header read, UID checks, spool commit.

    .venv/bin/python -m tests.fuzz.fuzz_receive CORPUS_DIR [libFuzzer flags]

CORPUS_DIR is filled with the seed corpus (pydicom's test files + tests/support/bad_input.py's corpus)
when it is empty; libFuzzer adds the inputs that reach new coverage to it. Useful flags:
`-max_total_time=600`, `-runs=N`, `-max_len=65536`, `-print_final_stats=1`, `-artifact_prefix=DIR/`.
An input that raises, answers a status outside `receive_target.REFUSALS` or leaves a temp file is a
crash: libFuzzer writes it as `crash-<sha1>` and exits non-zero. Figures of the documented long run:
docs/reliability.md, "Fuzzing". tests/unit/test_fuzz_receive.py runs a bounded run in the suite.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris


def _corpus_dir(argv: list[str]) -> Path | None:
    dirs = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    return dirs[0] if dirs else None


def main(argv: list[str]) -> None:
    # Coverage-guided only where the peer's bytes go: pydicom's reader and the node's receive path.
    with atheris.instrument_imports(include=["pydicom", "dicom_ai_node"]):
        from tests.fuzz.receive_target import ReceiveTarget, write_seed_corpus

    corpus = _corpus_dir(argv)
    if corpus is not None and (not corpus.exists() or not any(corpus.iterdir())):
        print(f"seed corpus: {write_seed_corpus(corpus)} files in {corpus}", file=sys.stderr)
    # /dev/shm: each stored input fsyncs its file, its directory and the SQLite WAL.
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-receive-", dir=shm if shm.is_dir() else None))
    target = ReceiveTarget(workdir)

    def test_one_input(data: bytes) -> None:
        target(data)

    atheris.Setup(argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:  # reached on a crash; a normal end (-runs, -max_total_time) exits from libFuzzer's C code
        _report(target)


def _report(target: Any) -> None:
    refused = ", ".join(f"0x{status:04X}: {n}" for status, n in sorted(target.refused.items()))
    print(f"receive path: stored {target.stored}, refused {{{refused}}}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
