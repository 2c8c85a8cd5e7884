"""The receive parse path under fuzzing (tests/fuzz/fuzz_receive.py): the seed corpus replayed, the inputs
the fuzzer found turned into regression tests, and a bounded atheris run as part of the suite."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai_node.domain.conformance import STATUS_CANNOT_UNDERSTAND
from dicom_ai_node.domain.ingest import FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED
from dicom_ai_node.receive.header import UnreadableDataset, read_header
from tests.fuzz.receive_target import ReceiveTarget, write_seed_corpus
from tests.support.bad_input import ct_dataset, write_part10

REPO = Path(__file__).parents[2]
# The bounded run: about 25 s of mutations after the seeds (the long run's figures: docs/reliability.md).
FUZZ_SECONDS = 25


def _file_meta_tweaked(path: Path, old: bytes, new: bytes) -> bytes:
    data = path.read_bytes()
    assert data.count(old) == 1
    return data.replace(old, new)


def test_seed_corpus_is_stored_or_refused(tmp_path: Path) -> None:
    count = write_seed_corpus(tmp_path / "corpus")
    target = ReceiveTarget(tmp_path / "work")
    for seed in sorted((tmp_path / "corpus").iterdir()):
        target(seed.read_bytes())
        target(seed.read_bytes() + b"\x00")  # the other edge (odd length: STOW-RS's acceptance checks)
    assert count > 150
    assert target.stored > 0 and sum(target.refused.values()) > 0


def test_a_transfer_syntax_uid_that_names_none_is_refused_not_raised(tmp_path: Path) -> None:
    """Found by fuzzing: one changed digit in the File Meta Transfer Syntax UID made the Pixel Data check
    raise ValueError ("UID is not a transfer syntax") instead of answering."""
    path = write_part10(tmp_path / "ct.dcm", ct_dataset(tmp_path))
    data = _file_meta_tweaked(path, ExplicitVRLittleEndian.encode(), b"1.2.840.10008.9.2.1")
    target = ReceiveTarget(tmp_path / "work")
    target(data + b"\x00")  # STOW-RS: refused as an unsupported transfer syntax
    assert target.refused == {FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED: 1}


def test_malformed_file_meta_and_value_lengths_are_cannot_understand(tmp_path: Path) -> None:
    """Found by fuzzing: an unknown VR in (0002,0002), converted only when read after the parse, and a
    value whose length is no multiple of its VR's size (pydicom's BytesLengthException), escaped the
    reader as exceptions (the C-STORE handler's 0xC211 and a traceback)."""
    path = write_part10(tmp_path / "ct.dcm", ct_dataset(tmp_path))
    unknown_vr = _file_meta_tweaked(path, b"\x02\x00\x02\x00UI", b"\x02\x00\x02\x00\x55\xff")
    ds = ct_dataset(tmp_path)
    del ds.PixelData
    rows = b"\x28\x00\x10\x00US\x02\x00" + struct.pack("<H", ds.Rows)
    odd_rows = write_part10(tmp_path / "rows.dcm", ds).read_bytes()
    assert odd_rows.count(rows) == 1
    # Rows (US, 2 bytes a value) declaring 3 bytes, the data set still aligned after it.
    odd_rows = odd_rows.replace(rows, b"\x28\x00\x10\x00US\x03\x00" + rows[-2:] + b"\x00")
    (tmp_path / "odd.dcm").write_bytes(odd_rows)
    with pytest.raises(UnreadableDataset, match="BytesLengthException"):
        read_header(tmp_path / "odd.dcm")
    target = ReceiveTarget(tmp_path / "work")
    target(unknown_vr)
    target(odd_rows)
    assert target.refused == {STATUS_CANNOT_UNDERSTAND: 2}


@pytest.mark.timeout(FUZZ_SECONDS + 120)
def test_bounded_atheris_run_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_receive",
            str(tmp_path / "corpus"),
            f"-max_total_time={FUZZ_SECONDS}",
            "-max_len=65536",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 90,
    )
    crashes = sorted(p.name for p in artifacts.iterdir())
    assert run.returncode == 0 and not crashes, f"{crashes}\n{run.stderr[-4000:]}"
    assert "stat::number_of_executed_units" in run.stderr
