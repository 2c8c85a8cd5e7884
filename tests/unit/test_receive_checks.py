"""The receive checks without a network: UID rules (PS3.5 9.1), the STOW-RS code mapping, and the bounded
header reader (no allocation from a declared length, one error for deep nesting)."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest

from dicom_ai_node.domain.conformance import is_valid_uid
from dicom_ai_node.receive.header import UnreadableDataset, read_header
from dicom_ai_node.receive.ingest import stow_failure_reason
from tests.support.bad_input import CASES, bad_instance, ct_dataset, write_part10


@pytest.mark.parametrize(
    "uid,valid",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("0", True),
        ("1.0.3", True),
        ("2.25." + "9" * 59, True),  # 64 characters
        ("2.25." + "9" * 60, False),  # 65
        ("", False),
        ("1.2.03", False),  # leading zero
        ("1..2", False),  # empty component
        ("1.2.", False),
        (".1.2", False),
        ("1.2.3/../4", False),
        ("1.2.3a", False),
        ("1.2 ", False),
        ("1.2\\1.3", False),  # two values
    ],
)
def test_uid_construction_rules(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_stow_failure_reasons_are_the_ps3_18_families() -> None:
    for name, (_, c_store_status, stow_reason) in CASES.items():
        assert stow_failure_reason(c_store_status) == stow_reason, name
    assert [stow_failure_reason(s) for s in (0xA700, 0x0122, 0xC122, 0xC210)] == [
        0xA700,
        0x0122,
        0xC122,
        0xC000,
    ]


def test_a_declared_length_never_becomes_an_allocation(tmp_path: Path) -> None:
    """A nested element declaring ~4 GB inside a sequence (not checked against the file end: pydicom reads
    sequences on its own) is read as what the file holds, not allocated."""
    ds = ct_dataset(tmp_path)
    del ds.PixelData
    item = b"\x08\x00\x18\x11UN\x00\x00" + struct.pack("<I", 0xFFFFFFF0) + b"junk"
    sequence = (
        b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0"
        + struct.pack("<I", len(item))
        + item
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    path = write_part10(tmp_path / "big.dcm", ds, extra=sequence)
    tracemalloc.start()
    try:
        try:
            read_header(path)
        except UnreadableDataset:
            pass  # refused or read: either way without the allocation
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_deep_nesting_is_one_error(tmp_path: Path) -> None:
    bad = bad_instance("sequences-nested-5000-deep", tmp_path)
    with pytest.raises(UnreadableDataset) as caught:
        read_header(bad.path)
    assert caught.value.status == 0xC213 and caught.value.__cause__ is None
