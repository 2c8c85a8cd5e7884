"""Memory work of issue 13: the volume shared with the inference child (one copy, file removed with it)
and the parallel decode of compressed frames (same volume, same first error as one frame at a time)."""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.errors import InvalidDicomError
from dicom_ai_node.infer import decode, volume
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.infer.transfer import TRANSFER_PREFIX
from dicom_ai_node.infer.volume import load_series
from tests.support.host_models import THRESHOLD, make_volume, tiny_registry


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceHost]:
    transfer = tmp_path_factory.mktemp("transfer")
    with InferenceHost(
        "cpu", [], timeout_s=30, registry_factory=tiny_registry, transfer_dir=transfer
    ) as shared:
        yield shared


def _volume_files(host: InferenceHost) -> list[Path]:
    return [p for d in host._transfer_dirs for p in d.glob(f"{TRANSFER_PREFIX}*-volume")]


def test_a_shared_volume_is_one_read_only_file_that_goes_with_it(host: InferenceHost) -> None:
    original = make_volume()
    expected = (original.array > THRESHOLD).astype(np.uint8)
    shared = host.share(original)
    np.testing.assert_array_equal(shared.array, original.array)
    assert not shared.array.flags.writeable
    assert len(_volume_files(host)) == 1

    result = host.run("threshold", shared)
    np.testing.assert_array_equal(result.label_map, expected)
    # The child read the shared file itself: no other transfer file is left, the shared one stays.
    assert len(_volume_files(host)) == 1

    del shared
    gc.collect()
    assert _volume_files(host) == []
    assert host._shared == {}


def test_a_volume_decoded_into_the_hosts_array_goes_to_the_child_as_it_is(
    host: InferenceHost, tmp_path: Path
) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=20, rows=32, cols=32)
    plain = load_series(paths)
    shared = load_series(paths, host.volume_array)
    np.testing.assert_array_equal(shared.array, plain.array)
    [file] = _volume_files(host)
    assert file.stat().st_size == plain.array.nbytes
    assert host.share(shared) is shared and not shared.array.flags.writeable

    result = host.run("threshold", shared)
    np.testing.assert_array_equal(result.label_map, (plain.array > THRESHOLD).astype(np.uint8))
    assert _volume_files(host) == [file]

    del shared
    gc.collect()
    assert _volume_files(host) == []


def test_sharing_in_process_keeps_the_volume() -> None:
    in_process = InferenceHost("cpu", [], timeout_s=0, registry_factory=tiny_registry)
    original = make_volume()
    assert in_process.share(original) is original
    assert in_process.volume_array((2, 3, 4)).base is None  # in memory, no file


def _j2k_series(directory: Path, frames: int) -> list[Path]:
    paths = write_ct_series(directory, n_slices=frames, rows=32, cols=32)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path, enforce_file_format=True)
    return paths


def test_parallel_decode_gives_the_sequential_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _j2k_series(tmp_path / "j2k", frames=20)
    sequential = load_series(paths)
    monkeypatch.setattr(volume, "decode_workers", lambda frames, compressed: 2)
    parallel = load_series(paths)
    assert parallel.array.dtype == np.float32
    np.testing.assert_array_equal(parallel.array, sequential.array)


def test_parallel_decode_raises_the_first_bad_frames_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _j2k_series(tmp_path / "j2k", frames=20)
    for index in (13, 5):  # two bad frames: the error names the first one in slice order
        ds = pydicom.dcmread(paths[index])
        ds.PixelData = ds.PixelData[:40]
        ds.save_as(paths[index], enforce_file_format=True)
    first_bad = str(pydicom.dcmread(paths[5], stop_before_pixels=True).SOPInstanceUID)
    with pytest.raises(InvalidDicomError) as sequential:
        load_series(paths)
    monkeypatch.setattr(volume, "decode_workers", lambda frames, compressed: 2)
    with pytest.raises(InvalidDicomError) as parallel:
        load_series(paths)
    assert first_bad in str(sequential.value)
    # The same message, but for the decoder's object addresses (each process has its own).
    assert re.sub(r"0x[0-9a-f]+", "0x?", str(parallel.value)) == re.sub(
        r"0x[0-9a-f]+", "0x?", str(sequential.value)
    )


def test_decode_workers_stays_in_process_when_it_does_not_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert decode.decode_workers(300, compressed=False) == 1
    assert decode.decode_workers(decode.MIN_PARALLEL_FRAMES - 1, compressed=True) == 1
    assert decode.decode_workers(300, compressed=True) == decode.MAX_DECODE_WORKERS
    monkeypatch.setattr(os, "getloadavg", lambda: (15.0, 0.0, 0.0))  # busy cores: no pool
    assert decode.decode_workers(300, compressed=True) == 1
