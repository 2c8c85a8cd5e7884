"""The inference process: its side of the pipe protocol, and what crosses the pipe.

Protocol, one duplex pipe, every message a tuple whose first item is its kind:
    parent -> child: ("run", Request) | ("stop",)
    child -> parent: ("ready", pid) once; ("log", dict) at any time; ("ok", Reply) | ("error", RemoteError)

- Only the first DICOM header crosses (for `series_instance_uid` and what a model may read from the
  series' common attributes); a model must not rely on per-instance headers, which stay with the worker.
- The child dies with its parent: PR_SET_PDEATHSIG(SIGKILL) on Linux (works even when the parent is
  SIGKILLed), a watchdog thread polling the parent pid (other platforms, and a parent that dies between
  the spawn and the prctl), and the request loop ends at EOF on the pipe.
- Errors: an exception the model raises comes back with its class kept for the node's own errors
  (InferenceError, InvalidDicomError, ModelNotFoundError, ...) and as InferenceError naming the original
  type otherwise; the child keeps running.
- Log records the child emits are forwarded through the pipe and handled by the parent's loggers, so
  model warnings land in the node's log.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import logging
import mmap
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicom_ai_node.errors import InferenceError, NodeError
from dicom_ai_node.infer.registry import ModelRegistry, default_registry
from dicom_ai_node.infer.runner import InferenceResult, run_model
from dicom_ai_node.infer.transfer import write_array
from dicom_ai_node.infer.volume import Volume

log = logging.getLogger(__name__)

RegistryFactory = Callable[[], ModelRegistry]

_WATCHDOG_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class Request:
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
class Reply:
    """The model's result without its label map, which waits in the file at `label_path`."""

    token: str
    result: InferenceResult  # label_map is None here
    label_path: str | None
    label_shape: tuple[int, ...]
    label_dtype: str


class RemoteTraceback(Exception):
    """The child's traceback, chained as the cause of the re-raised error so logs show where it failed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


@dataclass
class RemoteError:
    token: str
    module: str
    qualname: str
    message: str
    attrs: dict[str, Any]
    traceback: str

    @classmethod
    def of(cls, token: str, exc: BaseException) -> RemoteError:
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
        cls = node_error_class(self.module, self.qualname)
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
        exc.__cause__ = RemoteTraceback(self.traceback)
        return exc


def node_error_class(module: str, qualname: str) -> type[NodeError] | None:
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


def child_main(
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
    die_with_parent(parent_pid)
    try:
        # Own process group, so a kill also takes processes the model started.
        os.setpgid(0, 0)
    except OSError:
        pass
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    forward_logs(send, log_level)
    send(("ready", os.getpid()))
    registry: ModelRegistry | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent closed its end or died
        if message[0] != "run":
            break
        request: Request = message[1]
        try:
            if registry is None:
                registry = (
                    registry_factory()
                    if registry_factory is not None
                    else default_registry(device, user_paths)
                )
            reply = serve(registry, request)
            send(("ok", reply))
        except Exception as exc:
            send(("error", RemoteError.of(request.token, exc)))
        release_free_memory()
    conn.close()


def serve(registry: ModelRegistry, request: Request) -> Reply:
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
            write_array(
                [Path(p).parent for p in request.out_paths], Path(request.out_paths[0]).name, label_map
            )
        )
        label_shape, label_dtype = tuple(int(n) for n in label_map.shape), label_map.dtype.str
    return Reply(
        token=request.token,
        result=dataclasses.replace(result, label_map=None),
        label_path=label_path,
        label_shape=label_shape,
        label_dtype=label_dtype,
    )


def release_free_memory() -> None:
    """Hand the allocator's free memory back to the system between requests.

    A model's run frees hundreds of MB in blocks that glibc keeps for reuse (per thread arena): after a
    600-slice CT the idle process held 790 MB instead of 470. malloc_trim returns them; it exists in glibc
    only, elsewhere nothing happens.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def die_with_parent(parent_pid: int) -> None:
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
    threading.Thread(target=watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_WATCHDOG_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


class PipeLogHandler(logging.Handler):
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


def forward_logs(send: Callable[[tuple[Any, ...]], None], level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(PipeLogHandler(send))
    root.setLevel(level)
    logging.captureWarnings(True)


def handle_child_log(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def log_level() -> int:
    """The most verbose level the parent would log for the node or the root: the child sends no less."""
    return min(
        logging.getLogger().getEffectiveLevel(), logging.getLogger("dicom_ai_node").getEffectiveLevel()
    )
