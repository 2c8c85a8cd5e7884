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
- Volume transfer: the float32 array goes through a file in /dev/shm (tmpfs: memory, no disk I/O; the
  temp directory when /dev/shm is missing or full) that the child maps read-only, so a 300 MB series is
  neither pickled nor copied into the pipe, and the child sees it without a second copy. The label map
  comes back the same way. Plain write() rather than a shared mmap on the writing side: a full tmpfs
  then gives ENOSPC (an error we can report) instead of SIGBUS (a dead worker). The parent unlinks every
  transfer file in a `finally`, also after timeouts and crashes; files left by a parent that was itself
  killed are swept when the next host starts (their names carry the parent's pid).
- Only the first DICOM header crosses (for `series_instance_uid` and what a model may read from the
  series' common attributes); the built-in models read nothing else, and a model must not rely on
  per-instance headers, which stay with the worker for encoding.
- The child dies with its parent: PR_SET_PDEATHSIG(SIGKILL) on Linux (works even when the parent is
  SIGKILLed), a watchdog thread polling the parent pid (other platforms, and a parent that dies between
  the spawn and the prctl), and the request loop ends at EOF on the pipe.
- Errors: an exception the model raises comes back with its class kept for the node's own errors
  (InferenceError, InvalidDicomError, ModelNotFoundError, ...) and as InferenceError naming the original
  type otherwise; the child keeps running. A child that dies mid-request (segfault, OOM killer) gives an
  InferenceError naming the signal or exit code; a timeout gives InferenceTimeoutError.
- Log records the child emits are forwarded through the pipe and handled by the parent's loggers, so
  model warnings land in the node's log.

`timeout_s == 0` runs the models in this process instead (`InProcessHost`), without any limit: for tests,
debugging and profiling.

Protocol, one duplex pipe, every message a tuple whose first item is its kind:
    parent -> child: ("run", _Request) | ("stop",)
    child -> parent: ("ready", pid) once; ("log", dict) at any time; ("ok", _Reply) | ("error", _RemoteError)
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_ai_node.domain.results import FindingResult, FindingSpec, ModelIdentity, SegmentSpec
from dicom_ai_node.errors import InferenceError, InferenceTimeoutError, NodeError
from dicom_ai_node.infer.base import Task
from dicom_ai_node.infer.registry import ModelRegistry, default_registry
from dicom_ai_node.infer.volume import Volume

if TYPE_CHECKING:
    from dicom_ai_node.config import ModelSettings

log = logging.getLogger(__name__)

RegistryFactory = Callable[[], ModelRegistry]

# Transfer files are named f"{TRANSFER_PREFIX}{parent pid}-{request token}-{in|out}".
TRANSFER_PREFIX = "ainode-infer-"
# Spawning and importing the host module (numpy, pydicom, nibabel) takes seconds on a busy machine;
# model loading is not part of it (it counts against the request's timeout).
_STARTUP_TIMEOUT_S = 120.0
# How long close() lets an idle child exit after "stop", and how long a join after SIGKILL may take.
_STOP_GRACE_S = 5.0
_WATCHDOG_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class InferenceResult:
    """What one model call produced, with the model's metadata (the worker holds no model object).

    Segmentation: `label_map` (uint8 (frames, rows, cols) on the source grid) and `segments`;
    classification: `findings` and `finding_specs`. `seconds` is the model call alone (loading excluded),
    `device` where it ran.
    """

    task: Task
    label_map: np.ndarray | None
    findings: list[FindingResult] | None
    identity: ModelIdentity
    segments: list[SegmentSpec]
    finding_specs: list[FindingSpec]
    seconds: float
    device: str


def run_model(registry: ModelRegistry, model_name: str, volume: Volume) -> InferenceResult:
    """Run the (warm) model `model_name` on `volume`; the same code serves both hosts."""
    model = registry.get(model_name)
    accepts = tuple(getattr(model, "accepts_modalities", ()))
    if accepts and volume.modality not in accepts:
        # A rule that routes the wrong images to a model is a configuration error, not a result.
        raise InferenceError(
            f"model {model_name} accepts {', '.join(accepts)}, series {_series_uid(volume)} is "
            f"{volume.modality or 'without Modality'}: check the routing rule"
        )
    started = time.perf_counter()
    label_map: np.ndarray | None = None
    findings: list[FindingResult] | None = None
    if model.task == "segmentation":
        label_map = np.asarray(model.segment(volume))
    elif model.task == "classification":
        findings = list(model.classify(volume))
    else:
        raise InferenceError(f"model {model_name} has an unknown task {model.task!r}")
    seconds = time.perf_counter() - started
    return InferenceResult(
        task=model.task,
        label_map=label_map,
        findings=findings,
        identity=model.identity,
        segments=list(getattr(model, "segments", [])),
        finding_specs=list(getattr(model, "findings", [])),
        seconds=seconds,
        # Torch-backed models record the device they resolved; the others (classical image processing)
        # run on the CPU.
        device=str(getattr(model, "device", "cpu")),
    )


class InProcessHost:
    """Runs models in this process without a time limit (`inference_timeout_s: 0`): tests, debugging.

    Same API and error contract as InferenceHost: node errors pass through, anything else becomes an
    InferenceError naming the original type.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()

    def run(self, model_name: str, volume: Volume) -> InferenceResult:
        series_uid = _series_uid(volume)
        with self._lock:
            try:
                result = run_model(self.registry, model_name, volume)
            except NodeError:
                raise
            except Exception as exc:
                raise InferenceError(
                    f"model {model_name} failed on series {series_uid}: {type(exc).__name__}: {exc}"
                ) from exc
        _log_result(model_name, series_uid, result, "in-process")
        return result

    def close(self) -> None:
        """Nothing to stop; present so both hosts can be used alike."""

    def __enter__(self) -> InProcessHost:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class InferenceHost:
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
        self._transfer_dirs = [Path(transfer_dir)] if transfer_dir is not None else _default_transfer_dirs()
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._in_process: InProcessHost | None = None
        self._closed = False
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

    def close(self) -> None:
        """Stop the child: ask it to exit, kill it if it does not within a few seconds."""
        with self._lock:
            self._closed = True
            self._stop_child()

    def __enter__(self) -> InferenceHost:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- parent side ---------------------------------------------------------------------------------

    def _build_registry(self) -> ModelRegistry:
        if self._registry_factory is not None:
            return self._registry_factory()
        return default_registry(self.device, self.user_paths)

    def _run_in_child(self, model_name: str, volume: Volume) -> InferenceResult:
        series_uid = _series_uid(volume)
        array = np.ascontiguousarray(volume.array)
        if array.size == 0:
            raise InferenceError(f"series {series_uid}: empty volume {array.shape}")
        token = uuid.uuid4().hex
        stem = f"{TRANSFER_PREFIX}{os.getpid()}-{token}"
        out_paths = [d / f"{stem}-out" for d in self._transfer_dirs]
        in_path: Path | None = None
        try:
            in_path = _write_array(self._transfer_dirs, f"{stem}-in", array)
            conn = self._ensure_child()
            request = _Request(
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
            result = InferenceResult(
                task=reply.task,
                label_map=_read_array(Path(reply.label_path), reply.label_shape, reply.label_dtype)
                if reply.label_path is not None
                else None,
                findings=reply.findings,
                identity=reply.identity,
                segments=reply.segments,
                finding_specs=reply.finding_specs,
                seconds=reply.seconds,
                device=reply.device,
            )
        finally:
            # Whatever happened (timeout, crash, model error), no transfer file outlives the call.
            for path in [in_path, *out_paths]:
                if path is not None:
                    path.unlink(missing_ok=True)
        _log_result(model_name, series_uid, result, f"pid {self.child_pid}")
        return result

    def _exchange(
        self, conn: multiprocessing.connection.Connection, request: _Request, series_uid: str
    ) -> _Reply:
        """Send one request and wait for its answer within the timeout, handling what goes wrong."""
        deadline = time.monotonic() + self.timeout_s
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
                        _handle_child_log(message[1])
                    elif message[1].token != request.token:
                        # Cannot happen while every failure kills the child; kept as a guard against
                        # pairing a request with another one's answer.
                        log.warning("inference process answered a stale request; ignored")
                    elif kind == "ok":
                        reply: _Reply = message[1]
                        return reply
                    else:
                        remote: _RemoteError = message[1]
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
        _sweep_stale_transfers(self._transfer_dirs)
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        # Not a daemon: daemonic processes may not start processes, and a model may (data loaders).
        # The atexit hook below stops children so the interpreter's exit does not wait on them.
        process = context.Process(
            target=_child_main,
            name="ainode-inference",
            args=(
                child_conn,
                self.device,
                self.user_paths,
                self._registry_factory,
                os.getpid(),
                _log_level(),
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
                    _handle_child_log(message[1])
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


# Non-daemonic children are joined by multiprocessing's own exit hook, which would wait for ever on a
# live child; this hook is registered after it (multiprocessing is imported above), so it runs first.
_live_hosts: weakref.WeakSet[InferenceHost] = weakref.WeakSet()


@atexit.register
def _stop_all_hosts() -> None:
    for host in list(_live_hosts):
        host._kill_at_exit()


# -- messages ---------------------------------------------------------------------------------------


@dataclass
class _Request:
    token: str
    model_name: str
    array_path: str
    shape: tuple[int, ...]
    dtype: str
    out_paths: list[str]
    header: Any  # the series' first pydicom Dataset (headers only), or None
    paths: list[Path]
    spacing: tuple[float, float, float]
    affine_lps: np.ndarray
    modality: str


@dataclass
class _Reply:
    token: str
    task: Task
    label_path: str | None
    label_shape: tuple[int, ...]
    label_dtype: str
    findings: list[FindingResult] | None
    identity: ModelIdentity
    segments: list[SegmentSpec]
    finding_specs: list[FindingSpec]
    seconds: float
    device: str


class _RemoteTraceback(Exception):
    """The child's traceback, chained as the cause of the re-raised error so logs show where it failed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


@dataclass
class _RemoteError:
    token: str
    module: str
    qualname: str
    message: str
    attrs: dict[str, Any]
    traceback: str

    @classmethod
    def of(cls, token: str, exc: BaseException) -> _RemoteError:
        attrs: dict[str, Any] = {}
        try:
            pickle.dumps(vars(exc))
            attrs = dict(vars(exc))
        except Exception:  # attributes that do not pickle are dropped; the message still crosses
            attrs = {}
        return cls(
            token=token,
            module=type(exc).__module__,
            qualname=type(exc).__qualname__,
            message=str(exc),
            attrs=attrs,
            traceback="".join(traceback.format_exception(exc)),
        )

    def rebuild(self, model_name: str, series_uid: str) -> Exception:
        """The node's own error classes come back as themselves; anything else as InferenceError."""
        cls = _node_error_class(self.module, self.qualname)
        exc: Exception
        if cls is not None:
            # Bypass __init__: some errors take other arguments (ConfigError(key, message)), and the
            # message is already the final text.
            exc = cls.__new__(cls)
            Exception.__init__(exc, self.message)
            exc.__dict__.update(self.attrs)
        else:
            exc = InferenceError(
                f"model {model_name} failed on series {series_uid}: {self.qualname}: {self.message}"
            )
        exc.__cause__ = _RemoteTraceback(self.traceback)
        return exc


def _node_error_class(module: str, qualname: str) -> type[NodeError] | None:
    if module != "dicom_ai_node" and not module.startswith("dicom_ai_node."):
        return None  # import nothing else by name
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and issubclass(obj, NodeError):
        return obj
    return None


# -- child side -------------------------------------------------------------------------------------


def _child_main(
    conn: multiprocessing.connection.Connection,
    device: str,
    user_paths: list[Path],
    registry_factory: RegistryFactory | None,
    parent_pid: int,
    log_level: int,
) -> None:
    """The child's request loop: build the registry on first request, serve until "stop" or EOF."""
    # Ctrl-C in a terminal is for the parent, which decides when the child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    try:
        # Own process group, so a kill also takes processes the model started.
        os.setpgid(0, 0)
    except OSError:
        pass
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    _forward_logs(send, log_level)
    send(("ready", os.getpid()))
    registry: ModelRegistry | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent closed its end or died
        if message[0] != "run":
            break
        request: _Request = message[1]
        try:
            if registry is None:
                registry = (
                    registry_factory()
                    if registry_factory is not None
                    else default_registry(device, user_paths)
                )
            reply = _serve(registry, request)
            send(("ok", reply))
        except Exception as exc:
            send(("error", _RemoteError.of(request.token, exc)))
    conn.close()


def _serve(registry: ModelRegistry, request: _Request) -> _Reply:
    # A read-only view of the parent's file: no copy in the child, and a model that writes into its input
    # (which would corrupt the pixels the worker encodes next) fails loudly instead. The mapping is
    # released with the last reference to the array, when this function returns.
    with open(request.array_path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(mapped, dtype=np.dtype(request.dtype)).reshape(request.shape)
    volume = Volume(
        array=array,
        datasets=[request.header] if request.header is not None else [],
        paths=request.paths,
        spacing=request.spacing,
        affine_lps=request.affine_lps,
        modality=request.modality,
    )
    result = run_model(registry, request.model_name, volume)
    label_path: str | None = None
    label_shape: tuple[int, ...] = ()
    label_dtype = "|u1"
    if result.label_map is not None:
        label_map = np.ascontiguousarray(result.label_map)
        label_path = str(
            _write_array(
                [Path(p).parent for p in request.out_paths], Path(request.out_paths[0]).name, label_map
            )
        )
        label_shape, label_dtype = tuple(int(n) for n in label_map.shape), label_map.dtype.str
    return _Reply(
        token=request.token,
        task=result.task,
        label_path=label_path,
        label_shape=label_shape,
        label_dtype=label_dtype,
        findings=result.findings,
        identity=result.identity,
        segments=result.segments,
        finding_specs=result.finding_specs,
        seconds=result.seconds,
        device=result.device,
    )


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
    # The parent may have died before the prctl: then no signal will ever come.
    if os.getppid() != parent_pid:
        os._exit(1)
    # Belt and braces (and the only guard off Linux): poll the parent; os._exit does not need the main
    # thread, which may be deep inside a model.
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_WATCHDOG_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


class _PipeLogHandler(logging.Handler):
    """Sends the child's log records to the parent as plain dicts (records with args may not pickle)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            fields["exc_info"] = None
            fields = {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool | type(None))}
            self._send(("log", fields))
        except Exception:
            pass  # the parent is gone or the record is odd: logging must not break inference


def _forward_logs(send: Callable[[tuple[Any, ...]], None], level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_PipeLogHandler(send))
    root.setLevel(level)
    logging.captureWarnings(True)


def _handle_child_log(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def _log_level() -> int:
    """The most verbose level the parent would log for the node or the root: the child sends no less."""
    return min(
        logging.getLogger().getEffectiveLevel(), logging.getLogger("dicom_ai_node").getEffectiveLevel()
    )


# -- transfer files and processes -------------------------------------------------------------------


def _default_transfer_dirs() -> list[Path]:
    dirs = [Path("/dev/shm")] if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else []
    return [*dirs, Path(tempfile.gettempdir())]


def _write_array(dirs: Sequence[Path], name: str, array: np.ndarray) -> Path:
    """Write a C-contiguous array to `name` in the first directory with room; returns its path."""
    data = array.data.cast("B")
    problems: list[str] = []
    for directory in dirs:
        path = directory / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror}")
            continue
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                written = 0
                while written < len(data):
                    written += f.write(data[written:]) or 0
            return path
        except OSError as exc:  # ENOSPC on a small /dev/shm: try the next directory
            path.unlink(missing_ok=True)
            problems.append(f"{directory}: {exc.strerror}")
    raise InferenceError(f"cannot pass {array.nbytes} bytes to the inference process ({'; '.join(problems)})")


def _read_array(path: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    count = int(np.prod(shape))
    array = np.fromfile(path, dtype=np.dtype(dtype), count=count)
    if array.size != count:
        raise InferenceError(f"inference process returned {array.size} values, expected {count}")
    return array.reshape(shape)


def _sweep_stale_transfers(dirs: Sequence[Path]) -> None:
    """Remove transfer files of parents that no longer run (killed before their `finally`)."""
    for directory in dirs:
        try:
            names = [n for n in os.listdir(directory) if n.startswith(TRANSFER_PREFIX)]
        except OSError:
            continue
        for name in names:
            pid_text = name[len(TRANSFER_PREFIX) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_exists(int(pid_text)):
                (directory / name).unlink(missing_ok=True)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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


def _series_uid(volume: Volume) -> str:
    try:
        return volume.series_instance_uid
    except (IndexError, AttributeError):
        return "<unknown series>"


def _log_result(model_name: str, series_uid: str, result: InferenceResult, where: str) -> None:
    # Identifiers only: never patient name, ID or birth date.
    log.info(
        "model %s on series %s: %.2f s on %s (%s)",
        model_name,
        series_uid,
        result.seconds,
        result.device,
        where,
    )
