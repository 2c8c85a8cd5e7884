"""The inference host: models run in a child process that keeps them warm and can be killed.

Why a process: a Python thread cannot be stopped, so a model that hangs (a deadlocked CUDA call, an
endless loop in a user model) would hold a worker thread for ever. The worker thread therefore hands
each request to a child process that owns the model registry (models stay loaded between requests) and
waits at most `timeout_s` for the answer; past that the child's whole process group is SIGKILLed (torch
threads and any processes the model started included) and the next request starts a fresh child.

- Start method "spawn": forking a process that holds torch threads, CUDA state or the worker's database
  connections is unsafe; a spawned child imports what it needs and nothing else. Spawn re-imports the
  entry script in the child, so a script that creates a host must keep its work under
  `if __name__ == "__main__":` (the console script does; `python -m` modules are not re-imported).
- Volumes and label maps cross through files in /dev/shm (`transfer.py`); `share()` moves a volume there
  for good, so the worker does not hold a second copy while the model runs. The child's side, the pipe
  protocol, error and log forwarding and dying with the parent are in `child.py`; `run_model` and the
  in-process host are in `runner.py`.
- A child that dies mid-request (segfault, OOM killer) gives an InferenceError naming the signal or exit
  code; a timeout gives InferenceTimeoutError; the next request starts a fresh child.

`timeout_s == 0` runs the models in this process instead (`InProcessHost`), without any limit: for tests,
debugging and profiling.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicom_ai_node.errors import InferenceError, InferenceTimeoutError, NodeError
from dicom_ai_node.infer.child import (
    RegistryFactory,
    RemoteError,
    Reply,
    Request,
    child_main,
    handle_child_log,
    log_level,
)
from dicom_ai_node.infer.redact import redactor
from dicom_ai_node.infer.registry import ModelRegistry, default_registry
from dicom_ai_node.infer.runner import (
    ClosingHost,
    InferenceResult,
    InProcessHost,
    log_result,
    volume_series_uid,
)
from dicom_ai_node.infer.transfer import (
    BUNDLE_WORKDIR_PREFIX,
    TRANSFER_PREFIX,
    default_transfer_dirs,
    read_array,
    shared_array,
    sweep_dead_pid_entries,
    sweep_stale_transfers,
    write_array,
)
from dicom_ai_node.infer.volume import Volume

if TYPE_CHECKING:
    from dicom_ai_node.config import ModelSettings

__all__ = ["InProcessHost", "InferenceHost", "InferenceResult"]

log = logging.getLogger(__name__)

# Spawning and importing the host module (numpy, pydicom, nibabel) takes seconds on a busy machine;
# model loading is not part of it (it counts against the request's timeout).
_STARTUP_TIMEOUT_S = 120.0
# How long close() lets an idle child exit after "stop", and how long a join after SIGKILL may take.
_STOP_GRACE_S = 5.0


class InferenceHost(ClosingHost):
    """Runs models in a warm child process with a hard timeout per call (see the module docstring).

    One call at a time per host (a lock): a worker creates one host per worker thread for parallelism,
    each with its own child and its own warm models. The child starts on first use and again after it
    died or was killed.

    Caveat of PR_SET_PDEATHSIG: Linux delivers it when the *thread* that started the child ends, so
    use a host from long-lived threads (the worker's are); a child lost that way is restarted on the next
    call, with its models reloaded.
    """

    def __init__(
        self,
        device: str,
        user_paths: Sequence[Path],
        timeout_s: float,
        registry_factory: RegistryFactory | None = None,
        transfer_dir: Path | None = None,
    ) -> None:
        """`registry_factory` is called in the child (spawn pickles it: a module-level function or a
        functools.partial of one); without it the child builds `default_registry(device, user_paths)`.
        `transfer_dir` is where volumes are passed (default: /dev/shm, then the temp directory)."""
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        self.device = device
        self.user_paths = [Path(p) for p in user_paths]
        self.timeout_s = float(timeout_s)
        self._registry_factory = registry_factory
        self._transfer_dirs = [Path(transfer_dir)] if transfer_dir is not None else default_transfer_dirs()
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._in_process: InProcessHost | None = None
        self._closed = False
        # Volumes moved into transfer files by share(): id of the mapped array -> its file.
        self._shared: dict[int, Path] = {}
        _live_hosts.add(self)

    @classmethod
    def from_settings(
        cls, models: ModelSettings, registry_factory: RegistryFactory | None = None
    ) -> InferenceHost:
        return cls(models.device, models.paths, models.inference_timeout_s, registry_factory)

    @property
    def child_pid(self) -> int | None:
        """The pid of the running child, None before the first call, after close() or a kill."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def run(self, model_name: str, volume: Volume) -> InferenceResult:
        """Run `model_name` on `volume`; raises InferenceTimeoutError past the timeout, InferenceError
        when the child died, and the model's own node error (or InferenceError) when it failed."""
        with self._lock:
            if self._closed:
                raise InferenceError("the inference host is closed")
            if self.timeout_s == 0:
                if self._in_process is None:
                    self._in_process = InProcessHost(self._build_registry())
                return self._in_process.run(model_name, volume)
            return self._run_in_child(model_name, volume)

    def volume_array(self, shape: tuple[int, int, int]) -> np.ndarray:
        """A float32 array to decode a volume into (`load_series(paths, host.volume_array)`): a new
        transfer file mapped writable, which run() hands to the child as it is, so the voxels exist once,
        in /dev/shm (decode_into keeps only a few frames of it resident in the worker). The file is removed
        when the array is garbage (see share()). In-process (`timeout_s == 0`): a plain array."""
        if self.timeout_s == 0:
            return np.empty(shape, dtype=np.float32)
        name = f"{TRANSFER_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-volume"
        path, array = shared_array(self._transfer_dirs, name, shape, "<f4")
        self._register_shared(array, path)
        return array

    def share(self, volume: Volume) -> Volume:
        """`volume = host.share(volume)`: the same volume with its voxels in a transfer file, which run()
        hands to the child as it is, and read-only from now on.

        Without it a 600-slice CT is held twice while the model runs: 629 MB of float32 in the worker and
        the same again in /dev/shm for the child. A volume decoded into volume_array() is there already;
        any other is written there, and the returned array is the file mapped read-only: the caller's
        private array is freed once it drops it (rebinding its name does). Either way the voxels exist
        once, paged into the worker only where it reads them (key images). The file is removed when the
        array is garbage (a killed worker's file is swept by the next host, like any transfer file).
        In-process (`timeout_s == 0`) and for an empty volume: the volume itself.
        """
        if self.timeout_s == 0 or volume.array.size == 0:
            return volume
        if id(volume.array) in self._shared:
            volume.array.flags.writeable = False  # as the child sees it
            return volume
        array = np.ascontiguousarray(volume.array)
        name = f"{TRANSFER_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-volume"
        path = write_array(self._transfer_dirs, name, array)
        try:
            mapped = np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._register_shared(mapped, path)
        return dataclasses.replace(volume, array=mapped)

    def _register_shared(self, array: np.ndarray, path: Path) -> None:
        self._shared[id(array)] = path
        # The file goes with the mapping, so it shows in /dev/shm as long as its memory is held.
        weakref.finalize(array, _unshare, self._shared, id(array), path)

    def close(self) -> None:
        """Stop the child: ask it to exit, kill it if it does not within a few seconds."""
        with self._lock:
            self._closed = True
            self._stop_child()

    def interrupt(self) -> None:
        """Shutdown (SIGTERM): refuse new requests and kill the child now, without waiting for the lock
        that a running request holds; that request raises InferenceError at once (its job is released)."""
        self._closed = True
        process = self._process
        if process is not None and process.pid is not None and process.exitcode is None:
            _kill_process_group(process.pid)

    # -- parent side ---------------------------------------------------------------------------------

    def _build_registry(self) -> ModelRegistry:
        if self._registry_factory is not None:
            return self._registry_factory()
        return default_registry(self.device, self.user_paths)

    def _run_in_child(self, model_name: str, volume: Volume) -> InferenceResult:
        series_uid = volume_series_uid(volume)
        # A shared volume's file goes to the child as it is (removed with its array, see share()); any
        # other array is written to a transfer file of this call.
        shared_path = self._shared.get(id(volume.array))
        array = np.ascontiguousarray(volume.array)
        if array.size == 0:
            raise InferenceError(f"series {series_uid}: empty volume {array.shape}")
        token = uuid.uuid4().hex
        stem = f"{TRANSFER_PREFIX}{os.getpid()}-{token}"
        out_paths = [d / f"{stem}-out" for d in self._transfer_dirs]
        in_path: Path | None = None
        try:
            in_path = shared_path or write_array(self._transfer_dirs, f"{stem}-in", array)
            conn = self._ensure_child()
            request = Request(
                token=token,
                model_name=model_name,
                array_path=str(in_path),
                shape=tuple(int(n) for n in array.shape),
                dtype=array.dtype.str,
                out_paths=[str(p) for p in out_paths],
                header=volume.datasets[0] if volume.datasets else None,
                paths=list(volume.paths),
                spacing=volume.spacing,
                affine_lps=volume.affine_lps,
                modality=volume.modality,
            )
            reply = self._exchange(conn, request, series_uid)
            label_map = (
                read_array(Path(reply.label_path), reply.label_shape, reply.label_dtype)
                if reply.label_path is not None
                else None
            )
            result = dataclasses.replace(reply.result, label_map=label_map)
        finally:
            # Whatever happened (timeout, crash, model error), no transfer file outlives the call.
            for path in [in_path if shared_path is None else None, *out_paths]:
                if path is not None:
                    path.unlink(missing_ok=True)
        log_result(model_name, series_uid, result, f"pid {self.child_pid}")
        return result

    def _exchange(
        self, conn: multiprocessing.connection.Connection, request: Request, series_uid: str
    ) -> Reply:
        """Send one request and wait for its answer within the timeout, handling what goes wrong."""
        deadline = time.monotonic() + self.timeout_s
        redact = redactor(request.header)
        try:
            try:
                conn.send(("run", request))
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not conn.poll(remaining):
                        break
                    message = conn.recv()
                    kind = message[0]
                    if kind == "log":
                        # A model (user code) may log the header it read: not its patient values.
                        handle_child_log(
                            {k: redact(v) if isinstance(v, str) else v for k, v in message[1].items()}
                        )
                    elif message[1].token != request.token:
                        # Cannot happen while every failure kills the child; kept as a guard against
                        # pairing a request with another one's answer.
                        log.warning("inference process answered a stale request; ignored")
                    elif kind == "ok":
                        reply: Reply = message[1]
                        return reply
                    else:
                        remote: RemoteError = message[1]
                        raise remote.rebuild(request.model_name, series_uid)
            except (EOFError, OSError):
                # EOF comes as the dying child closes its pipe, a moment before it can be reaped: wait
                # for its own exit status rather than replacing it with our SIGKILL.
                exitcode = self._kill_child(grace_s=_STOP_GRACE_S)
                raise InferenceError(
                    f"inference process died ({_describe_exit(exitcode)}) while model {request.model_name} "
                    f"ran on series {series_uid}"
                ) from None
        except NodeError:
            raise
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt, an unpicklable request...): the child's state
            # is unknown, so it must not serve the next request.
            self._kill_child()
            raise
        self._kill_child()
        log.warning(
            "model %s exceeded %g s on series %s: inference process killed",
            request.model_name,
            self.timeout_s,
            series_uid,
        )
        raise InferenceTimeoutError(
            f"model {request.model_name} did not finish within {self.timeout_s:g} s on series {series_uid}: "
            "its process was killed"
        )

    def _ensure_child(self) -> multiprocessing.connection.Connection:
        if self._process is not None and not self._process.is_alive():
            exitcode = self._kill_child()
            log.warning(
                "inference process exited while idle (%s): starting a new one", _describe_exit(exitcode)
            )
        if self._process is None or self._conn is None:
            self._start_child()
        assert self._conn is not None
        return self._conn

    def _start_child(self) -> None:
        sweep_stale_transfers(self._transfer_dirs)
        sweep_dead_pid_entries(Path(tempfile.gettempdir()), BUNDLE_WORKDIR_PREFIX)
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        # Not a daemon: daemonic processes may not start processes, and a model may (data loaders).
        # The atexit hook below stops children so the interpreter's exit does not wait on them.
        process = context.Process(
            target=child_main,
            name="ainode-inference",
            args=(
                child_conn,
                self.device,
                self.user_paths,
                self._registry_factory,
                os.getpid(),
                log_level(),
            ),
        )
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            # The parent keeps only its own end, so the child's death reads as EOF here.
            child_conn.close()
        self._process, self._conn = process, parent_conn
        try:
            deadline = time.monotonic() + _STARTUP_TIMEOUT_S
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not parent_conn.poll(remaining):
                    raise InferenceError(f"inference process did not start within {_STARTUP_TIMEOUT_S:g} s")
                message = parent_conn.recv()
                if message[0] == "log":
                    handle_child_log(message[1])
                elif message[0] == "ready":
                    break
        except (EOFError, OSError):
            exitcode = self._kill_child(grace_s=_STOP_GRACE_S)
            raise InferenceError(
                f"inference process failed to start ({_describe_exit(exitcode)}; its traceback is on stderr)"
            ) from None
        except BaseException:
            self._kill_child()
            raise
        log.info("inference process %d started (device %s)", process.pid, self.device)

    def _stop_child(self) -> None:
        """Ask the child to exit; kill it if it does not (it is idle: the caller holds the lock)."""
        process, conn = self._process, self._conn
        if process is None:
            return
        try:
            if conn is not None and process.is_alive():
                conn.send(("stop",))
                process.join(_STOP_GRACE_S)
        except OSError:
            pass  # already gone
        self._kill_child()

    def _kill_child(self, grace_s: float = 0.0) -> int | None:
        """SIGKILL the child's process group (after `grace_s` to exit by itself), reap it, forget it;
        returns its exit code."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if grace_s > 0 and process.exitcode is None:
            process.join(grace_s)
        if process.exitcode is None and process.pid is not None:
            _kill_process_group(process.pid)
            # SIGKILL cannot be caught; the join only waits for the kernel to tear the process down.
            process.join(_STOP_GRACE_S)
            if process.exitcode is None:
                log.error(
                    "inference process %d did not die after SIGKILL (stuck in the kernel?)", process.pid
                )
                return None
        return process.exitcode

    def _kill_at_exit(self) -> None:
        """Interpreter exit: stop the child even if a worker thread is stuck inside run()."""
        if self._lock.acquire(timeout=1.0):
            try:
                self._closed = True
                self._stop_child()
            finally:
                self._lock.release()
        else:
            process = self._process
            if process is not None and process.pid is not None and process.exitcode is None:
                _kill_process_group(process.pid)
                process.join(_STOP_GRACE_S)


def _unshare(shared: dict[int, Path], key: int, path: Path) -> None:
    shared.pop(key, None)
    path.unlink(missing_ok=True)


# Non-daemonic children are joined by multiprocessing's own exit hook, which would wait for ever on a
# live child; this hook is registered after it (multiprocessing is imported above), so it runs first.
_live_hosts: weakref.WeakSet[InferenceHost] = weakref.WeakSet()


@atexit.register
def _stop_all_hosts() -> None:
    for host in list(_live_hosts):
        host._kill_at_exit()


def _kill_process_group(pid: int) -> None:
    try:
        # Only when the child leads its own group: before its setpgid the group is ours.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
