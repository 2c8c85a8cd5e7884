"""The inference host: warm models in a child process, a hard timeout that really kills, recovery.

Spawning a child costs about a second (imports), so most tests share one module-scoped host and the
tests that kill its child come last; the models are the tiny ones of tests/support/host_models.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dicom_ai_node.devtools.synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_ct_series
from dicom_ai_node.errors import InferenceError, InferenceTimeoutError
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.infer.transfer import (
    BUNDLE_WORKDIR_PREFIX,
    TRANSFER_PREFIX,
    sweep_dead_pid_entries,
    write_array,
)
from dicom_ai_node.infer.volume import Volume, load_series
from tests.support.host_models import (
    BRIGHT,
    FOUND_NOTHING,
    SERIES_UID,
    THRESHOLD,
    make_volume,
    tiny_registry,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def host() -> Iterator[InferenceHost]:
    with InferenceHost("cpu", [], timeout_s=TIMEOUT_S, registry_factory=tiny_registry) as shared:
        yield shared


@pytest.fixture
def volume() -> Volume:
    return make_volume()


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by a container's init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _our_transfer_files() -> list[str]:
    prefix = f"{TRANSFER_PREFIX}{os.getpid()}-"
    return [
        n for d in ("/dev/shm", "/tmp") if os.path.isdir(d) for n in os.listdir(d) if n.startswith(prefix)
    ]


def test_segmentation_runs_in_the_child(host: InferenceHost, volume: Volume) -> None:
    result = host.run("threshold", volume)

    assert result.task == "segmentation"
    assert result.label_map is not None and result.label_map.dtype == np.uint8
    np.testing.assert_array_equal(result.label_map, (volume.array > THRESHOLD).astype(np.uint8))
    assert result.identity.name == "threshold"
    assert [s.label_value for s in result.segments] == [1]
    assert result.findings is None and result.finding_specs == []
    assert result.device == "cpu" and result.seconds >= 0
    assert host.child_pid is not None and host.child_pid != os.getpid()
    assert _our_transfer_files() == []


def test_classification_runs_in_the_child(host: InferenceHost, volume: Volume) -> None:
    result = host.run("bright", volume)

    assert result.task == "classification" and result.label_map is None
    assert result.finding_specs == [BRIGHT]
    assert result.findings is not None and len(result.findings) == 1
    assert result.findings[0].probability == pytest.approx(float((volume.array > THRESHOLD).mean()))


def test_a_real_series_header_crosses_to_the_child(host: InferenceHost, tmp_path: Path) -> None:
    volume = load_series(write_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32))
    result = host.run("threshold", volume)
    assert result.label_map is not None
    np.testing.assert_array_equal(result.label_map, (volume.array > THRESHOLD).astype(np.uint8))


def test_models_stay_warm_between_calls(host: InferenceHost, volume: Volume) -> None:
    first = host.run("threshold", volume)
    pid = host.child_pid
    second = host.run("threshold", volume)
    # The identity carries a token made at construction: the same token is the same model instance.
    assert second.identity.description == first.identity.description
    assert host.child_pid == pid


def test_logs_name_model_and_series_but_no_patient(
    host: InferenceHost, volume: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dicom_ai_node"):
        host.run("threshold", volume)
    assert any("threshold" in r.getMessage() and SERIES_UID in r.getMessage() for r in caplog.records)
    assert FAKE_PATIENT_NAME not in caplog.text and FAKE_PATIENT_ID not in caplog.text


def test_model_errors_keep_their_class_and_the_child(host: InferenceHost, volume: Volume) -> None:
    host.run("threshold", volume)
    pid = host.child_pid

    with pytest.raises(InferenceError) as node_error:
        host.run("fails", volume)
    assert type(node_error.value) is InferenceError and str(node_error.value) == FOUND_NOTHING

    with pytest.raises(InferenceError, match=r"model buggy failed on series .*: KeyError: 'spacing'"):
        host.run("buggy", volume)

    assert host.child_pid == pid
    assert _our_transfer_files() == []


def test_a_model_cannot_write_into_the_workers_pixels(host: InferenceHost, volume: Volume) -> None:
    before = volume.array.copy()
    with pytest.raises(InferenceError, match="read-only"):
        host.run("inplace", volume)
    np.testing.assert_array_equal(volume.array, before)


def test_timeout_kills_the_hung_model_and_the_next_call_gets_a_fresh_child(
    host: InferenceHost, volume: Volume
) -> None:
    warm = host.run("threshold", volume)  # the child is up: the timing below is the model's alone
    pid = host.child_pid
    assert pid is not None

    started = time.monotonic()
    with pytest.raises(InferenceTimeoutError) as timeout:
        host.run("hang", volume)
    elapsed = time.monotonic() - started

    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3
    assert "hang" in str(timeout.value) and SERIES_UID in str(timeout.value) and "2 s" in str(timeout.value)
    assert not _alive(pid)
    assert host.child_pid is None
    assert _our_transfer_files() == []

    again = host.run("threshold", volume)
    assert again.label_map is not None
    assert host.child_pid not in (None, pid)
    assert again.identity.description != warm.identity.description  # reloaded in the new child


@pytest.mark.parametrize(
    ("model", "reason"), [("crash", "killed by signal SIGKILL"), ("exit", "exit code 3")]
)
def test_a_dying_child_is_reported_and_replaced(
    host: InferenceHost, volume: Volume, model: str, reason: str
) -> None:
    host.run("threshold", volume)
    pid = host.child_pid
    assert pid is not None

    with pytest.raises(InferenceError, match=f"inference process died \\({reason}\\) while model {model}"):
        host.run(model, volume)
    assert not _alive(pid)
    assert _our_transfer_files() == []

    assert host.run("threshold", volume).label_map is not None
    assert host.child_pid not in (None, pid)


def test_close_stops_the_child(volume: Volume) -> None:
    host = InferenceHost("cpu", [], timeout_s=TIMEOUT_S, registry_factory=tiny_registry)
    host.run("threshold", volume)
    pid = host.child_pid
    assert pid is not None

    host.close()

    assert not _alive(pid)
    with pytest.raises(InferenceError, match="closed"):
        host.run("threshold", volume)


def test_the_child_dies_with_its_parent() -> None:
    script = textwrap.dedent(
        """
        import time
        from dicom_ai_node.infer.host import InferenceHost
        from tests.support.host_models import make_volume, tiny_registry

        host = InferenceHost("cpu", [], timeout_s=30, registry_factory=tiny_registry)
        host.run("threshold", make_volume())
        print(host.child_pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_timeout_zero_runs_in_process(volume: Volume) -> None:
    with InferenceHost("cpu", [], timeout_s=0, registry_factory=tiny_registry) as host:
        result = host.run("threshold", volume)
        assert result.label_map is not None
        np.testing.assert_array_equal(result.label_map, (volume.array > THRESHOLD).astype(np.uint8))
        assert host.child_pid is None

        with pytest.raises(InferenceError) as node_error:
            host.run("fails", volume)
        assert type(node_error.value) is InferenceError
        with pytest.raises(InferenceError, match="KeyError"):
            host.run("buggy", volume)


def test_no_room_for_the_volume_is_an_inference_error(tmp_path: Path, volume: Volume) -> None:
    host = InferenceHost(
        "cpu", [], timeout_s=TIMEOUT_S, registry_factory=tiny_registry, transfer_dir=tmp_path / "no"
    )
    with pytest.raises(InferenceError, match="cannot pass"):
        host.run("threshold", volume)
    assert host.child_pid is None  # refused before a child was started
    host.close()


def test_transfer_falls_back_to_the_next_directory(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_array([tmp_path / "missing", tmp_path], "x", array)
    assert path == tmp_path / "x"
    np.testing.assert_array_equal(np.fromfile(path, np.float32).reshape(3, 4), array)


def test_scratch_of_dead_processes_is_swept_and_live_ones_kept(tmp_path: Path) -> None:
    """A SIGKILLed inference process leaves its bundle workdir and transfer files; the next one sweeps."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    gone_dir = tmp_path / f"{BUNDLE_WORKDIR_PREFIX}{dead.pid}-bundle-x1"
    (gone_dir / "in").mkdir(parents=True)
    (gone_dir / "in" / "image.nii.gz").write_bytes(b"x")
    gone_file = tmp_path / f"{TRANSFER_PREFIX}{dead.pid}-token-in"
    gone_file.write_bytes(b"x")
    live_dir = tmp_path / f"{BUNDLE_WORKDIR_PREFIX}{os.getpid()}-bundle-x2"
    live_dir.mkdir()
    other = tmp_path / "not-ours"
    other.mkdir()
    sweep_dead_pid_entries(tmp_path, BUNDLE_WORKDIR_PREFIX)
    sweep_dead_pid_entries(tmp_path, TRANSFER_PREFIX)
    assert not gone_dir.exists() and not gone_file.exists()
    assert live_dir.is_dir() and other.is_dir()


def test_cuda_without_a_gpu_falls_back_to_cpu_at_once() -> None:
    import torch

    from dicom_ai_node.infer.torch_model import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"  # this test's machine has no GPU
    started = time.monotonic()
    assert resolve_device("cuda") == expected
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    assert time.monotonic() - started < 5


def test_a_series_of_another_modality_is_refused_with_the_rule_to_check(host: InferenceHost) -> None:
    mr = make_volume()
    mr.modality = "MR"
    with pytest.raises(InferenceError, match="accepts CT, series .* is MR: check the routing rule"):
        host.run("threshold", mr)
