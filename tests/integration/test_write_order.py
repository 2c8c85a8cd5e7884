"""The order of durable writes before each acknowledgement, read from the node's own system calls.

kill -9 keeps the operating system's page cache, so the fault tests cannot show what a power cut does.
What they cannot show is proven here instead: the real node (`dicom-ai-node serve`, SQLite, spool on disk)
runs under strace, launched by strace itself (ptrace of a child works under Yama ptrace_scope 1, as in CI
containers), while DCMTK storescu sends a few instances over one association and a STOW-RS client posts
a few more. For every instance the trace must read, in this order (each call finished before the next
began, strace's output being one total order of the calls it saw):

    write(temp file) -> fsync(temp file) -> rename(temp file, spool file) -> fsync(spool file's directory)
    -> write of the instance's row (its SOP Instance UID) to the database -> fsync/fdatasync of the database
    -> send of the C-STORE-RSP naming the instance (or of the STOW-RS HTTP 200 listing it)

`-yy` prints each file descriptor's path (or TCP endpoints), which ties every call to its file; the
system calls of all threads are interleaved, so calls that strace reports as `<unfinished ...>` and
`<... resumed>` are stitched back together per thread.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.db import make_engine
from dicom_ai_node.persistence.repository import SeriesRepository
from tests.support.tools import require_executable

# Writes of file data, the two syncs SQLite and the spool use, renames and directory creation (rename and
# mkdir on x86-64, renameat(2) and mkdirat elsewhere: a regex matches whichever the architecture has), and
# socket sends.
TRACED = "write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,sendto,sendmsg,/^(rename|mkdir)"
# Long enough for a whole SQLite page (4096 bytes) and a whole C-STORE-RSP or HTTP response head.
STRING_BYTES = 8192
DIMSE_INSTANCES = 4
STOW_INSTANCES = 3
BOUNDARY = "write-order-boundary"


# -- reading an strace log --------------------------------------------------------------------------


@dataclass(frozen=True)
class Syscall:
    """One system call: `entered` and `returned` are positions in strace's output (its total order)."""

    tid: int
    time: str
    name: str
    args: str
    result: str
    entered: int
    returned: int

    @property
    def fd_path(self) -> str | None:
        """The path (or `TCP:[local->peer]`) that `-yy` printed for the first argument, if it is an fd."""
        match = _FD.match(self.args)
        return match.group(1) if match else None

    @property
    def ok(self) -> bool:
        return not self.result.startswith(("-", "?"))

    def strings(self) -> list[bytes]:
        """The quoted string arguments, unescaped to the bytes the call passed."""
        return [_unescape(s) for s in _QUOTED.findall(self.args)]

    def data(self) -> bytes:
        """The buffer of a write or send (its first string argument; truncated at STRING_BYTES)."""
        strings = self.strings()
        return strings[0] if strings else b""

    def brief(self) -> str:
        args = self.args if len(self.args) <= 110 else self.args[:100] + '..."...'
        return f"{self.tid} {self.time} {self.name}({args}) = {self.result}"


_LINE = re.compile(r"^(\d+)\s+(\d\d:\d\d:\d\d\.\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_COMPLETE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?|0x[0-9a-f]+)(.*)$")
_UNFINISHED = " <unfinished ...>"
# An fd as -yy prints it: 12</spool/incoming/tmpx.dcm> or 11<TCP:[127.0.0.1:104->127.0.0.1:5000]>.
_FD = re.compile(r"^\d+<((?:[A-Za-z0-9]+:\[[^\]]*\])|[^>]*)>")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92, '"': 34, "'": 39}


def _unescape(text: str) -> bytes:
    """strace's C-style string (\\ooo, \\xHH, \\n ...) back to bytes."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("latin-1", "replace")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        elif nxt in "01234567":
            j = i + 1
            while j < len(text) and j < i + 4 and text[j] in "01234567":
                j += 1
            out.append(int(text[i + 1 : j], 8) & 0xFF)
            i = j
        else:
            out.append(_ESCAPES.get(nxt, ord(nxt)))
            i += 2
    return bytes(out)


def parse_strace(lines: Sequence[str]) -> list[Syscall]:
    """Syscalls in the order they returned, from `strace -f -tt -yy` output; calls interrupted by
    another thread's (`<unfinished ...>` ... `<... name resumed>`) are joined per thread."""
    calls: list[Syscall] = []
    pending: dict[int, tuple[str, str, str, int]] = {}
    for index, line in enumerate(lines):
        match = _LINE.match(line.rstrip("\n"))
        if match is None:
            continue
        tid, stamp, body = int(match.group(1)), match.group(2), match.group(3)
        if body.startswith(("+++", "---")):
            continue  # exits and signals
        resumed = _RESUMED.match(body)
        if resumed is not None:
            name, rest = resumed.groups()
            if tid not in pending or pending[tid][0] != name:
                continue  # began before tracing started
            _, head, began_at, entered = pending.pop(tid)
            body, stamp_entered = f"{name}({head}{rest}", began_at
        elif body.endswith(_UNFINISHED):
            head = body[: -len(_UNFINISHED)]
            name, _, args = head.partition("(")
            pending[tid] = (name, args, stamp, index)
            continue
        else:
            entered, stamp_entered = index, stamp
        complete = _COMPLETE.match(body)
        if complete is None:
            continue  # e.g. "= ? <unavailable>" of a thread that exited inside the call
        name, args, value, tail = complete.groups()
        calls.append(Syscall(tid, stamp_entered, name, args, value + tail, entered, index))
    return calls


# -- what must hold for each instance --------------------------------------------------------------


@dataclass(frozen=True)
class DurableSteps:
    """The calls that made one instance durable, in the order they must have happened."""

    sop_instance_uid: str
    write: Syscall
    fsync_file: Syscall
    rename: Syscall
    fsync_dir: Syscall
    db_write: Syscall
    db_sync: Syscall
    answer: Syscall

    def in_order(self) -> list[Syscall]:
        return [
            self.write,
            self.fsync_file,
            self.rename,
            self.fsync_dir,
            self.db_write,
            self.db_sync,
            self.answer,
        ]


_SYNCS = ("fsync", "fdatasync")
_SENDS = ("sendto", "sendmsg", "write", "writev")
# Whether a send is the answer for the instance whose UID (bytes) is given.
AnswerTest = Callable[[Syscall, bytes], bool]


def _is_db_file(path: str | None, database: Path) -> bool:
    return path is not None and path in {str(database), f"{database}-wal", f"{database}-journal"}


def durable_steps(
    calls: Sequence[Syscall], uid: str, spool_file: Path, database: Path, is_answer: AnswerTest
) -> DurableSteps:
    """Find the durable steps of instance `uid` (stored as `spool_file`); AssertionError naming the step
    that is missing or out of order. Each step is the first call of its kind after the previous step
    returned, so "after" always means: began after the previous one had finished."""
    key = uid.encode()
    final = str(spool_file)
    renames = [c for c in calls if c.name.startswith("rename") and c.ok and final in _decoded(c)]
    assert len(renames) == 1, f"{uid}: {len(renames)} renames to {final}"
    rename = renames[0]
    temp = next(p for p in _decoded(rename) if p != final)
    assert os.path.dirname(temp) != os.path.dirname(final), f"{uid}: renamed within one directory"

    def first(
        after: Syscall | None, before: Syscall | None, what: str, test: Callable[[Syscall], bool]
    ) -> Syscall:
        for call in calls:
            if after is not None and call.entered <= after.returned:
                continue
            if test(call):
                if before is not None:
                    assert call.returned < before.entered, (
                        f"{uid}: {what} did not finish before {before.brief()}:\n  {call.brief()}"
                    )
                return call
        raise AssertionError(f"{uid}: no {what} after {after.brief() if after else 'the start'}")

    directory = os.path.dirname(final)
    created = [
        c
        for c in calls
        if c.name.startswith("mkdir") and c.ok and directory in _decoded(c) and c.returned < rename.entered
    ]
    if created:
        # A new shard directory: its own entry in the parent must be durable before a file goes into it.
        parent = os.path.dirname(directory)
        first(
            created[-1],
            rename,
            "fsync of the new directory's parent",
            lambda c: c.name in _SYNCS and c.fd_path == parent,
        )
    writes = [c for c in calls if c.name.startswith(("write", "pwrite")) and c.fd_path == temp and c.ok]
    assert writes, f"{uid}: no write to its temp file {temp}"
    last_write = max(writes, key=lambda c: c.returned)
    assert last_write.returned < rename.entered, (
        f"{uid}: the temp file was written during or after its rename"
    )
    fsync_file = first(
        last_write, rename, "fsync of the temp file", lambda c: c.name in _SYNCS and c.fd_path == temp
    )
    assert fsync_file.ok, fsync_file.brief()
    fsync_dir = first(
        rename, None, "fsync of the spool directory", lambda c: c.name in _SYNCS and c.fd_path == directory
    )
    db_write = first(
        fsync_dir,
        None,
        "database write holding the SOP Instance UID",
        lambda c: (
            c.name.startswith(("write", "pwrite")) and _is_db_file(c.fd_path, database) and key in c.data()
        ),
    )
    db_sync = first(
        db_write, None, "database fsync", lambda c: c.name in _SYNCS and _is_db_file(c.fd_path, database)
    )
    assert db_sync.ok, db_sync.brief()
    answers = [c for c in calls if c.name in _SENDS and is_answer(c, key)]
    assert answers, f"{uid}: no answer naming it was sent"
    answer = min(answers, key=lambda c: c.entered)
    assert answer.entered > db_sync.returned, (
        f"{uid}: answered before its database commit was durable:\n  {answer.brief()}\n  {db_sync.brief()}"
    )
    steps = DurableSteps(uid, last_write, fsync_file, rename, fsync_dir, db_write, db_sync, answer)
    ordered = steps.in_order()
    for earlier, later in zip(ordered, ordered[1:], strict=False):
        assert earlier.returned < later.entered, f"{uid}: {earlier.brief()}\n  not before {later.brief()}"
    return steps


def _decoded(call: Syscall) -> list[str]:
    return [s.decode("utf-8", "replace") for s in call.strings()]


def is_c_store_rsp(call: Syscall, uid: bytes) -> bool:
    """A P-DATA-TF PDU (type 0x04) sent on a TCP socket, carrying the instance's UID: its C-STORE-RSP
    (the node sends no other P-DATA naming a received instance)."""
    data = call.data()
    return (call.fd_path or "").startswith("TCP") and data[:1] == b"\x04" and uid in data


# -- the traced node --------------------------------------------------------------------------------


@dataclass
class TracedRun:
    calls: list[Syscall]
    trace: Path  # kept in the test's temp dir, to read when an assertion fails
    database: Path
    dimse: dict[str, Path]  # SOP Instance UID -> its spool file, for the instances sent by C-STORE
    stow: dict[str, Path]  # and by STOW-RS


def _strace_launcher(trace: Path) -> tuple[str, ...]:
    strace = require_executable("strace", "apt-get install strace (scripts/bootstrap.sh installs it)")
    return (
        strace,
        "-f",  # every thread (association, DUL, HTTP and thread-pool threads)
        "--seccomp-bpf",  # stop only on the traced calls: the node runs at near its normal speed
        "-qq",
        "-e",
        "signal=none",
        "-tt",
        "-yy",
        "-s",
        str(STRING_BYTES),
        "-e",
        f"trace={TRACED}",
        "-o",
        str(trace),
        "--",
    )


def _sender_token(database_url: str) -> str:
    engine = make_engine(database_url)
    try:
        accounts = AccountRepository(engine)
        accounts.create_user("modality", Role.SENDER, secrets.token_urlsafe(24))
        secret, _ = accounts.create_token("modality", "write-order")
    finally:
        engine.dispose()
    return secret


def _multipart(contents: Sequence[bytes]) -> bytes:
    parts = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + c + b"\r\n" for c in contents
    )
    return parts + f"--{BOUNDARY}--\r\n".encode()


def _node_pid(launcher_pid: int, timeout_s: float = 10) -> int:
    """The traced node: strace's only child (from /proc/*/stat, whose 4th field is the parent pid)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # The command name (2nd field) is in parentheses and may hold spaces: split after it.
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # the process ended meanwhile
            if int(fields[1]) == launcher_pid:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise TimeoutError("strace started no child")


def _spool_files(repo: SeriesRepository, spool: Path, series_uid: str) -> dict[str, Path]:
    return {
        i.sop_instance_uid: Path(os.path.realpath(spool / i.spool_path))
        for i in repo.instances_of_series(series_uid)
    }


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedRun]:
    work = Path(os.path.realpath(tmp_path_factory.mktemp("write-order")))
    trace = work / "strace.log"
    node = NodeProcess(
        work / "node",
        pacs_aet="PACS",
        pacs_port=1,  # no destination is used: no workers run
        serve_args=("--no-workers",),
        launcher=_strace_launcher(trace),
    )
    try:
        node.start(timeout_s=120)
        assert node.proc is not None
        node_pid = _node_pid(node.proc.pid)
        dimse_files = write_ct_series(work / "dimse", n_slices=DIMSE_INSTANCES, rows=16, cols=16)
        storescu(dimse_files, node.ae_title, node.dicom_port)  # one association
        stow_files = write_ct_series(work / "stow", n_slices=STOW_INSTANCES, rows=16, cols=16)
        response = requests.post(
            f"{node.http_url}/dicom-web/studies",
            data=_multipart([f.read_bytes() for f in stow_files]),
            headers={
                "Authorization": f"Bearer {_sender_token(node.database_url)}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "Accept": "application/dicom+json",
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        # strace ignores SIGTERM while it traces a program it started: stop the node itself.
        os.kill(node_pid, signal.SIGTERM)
        assert node.proc.wait(timeout=60) == 0, node.log_tail()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
    database = Path(node.database_url.removeprefix("sqlite:///"))
    spool = work / "node" / "spool"
    engine = make_engine(node.database_url)
    try:
        repo = SeriesRepository(engine)
        series = {
            name: str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, files in (("dimse", dimse_files), ("stow", stow_files))
        }
        dimse = _spool_files(repo, spool, series["dimse"])
        stow = _spool_files(repo, spool, series["stow"])
    finally:
        engine.dispose()
    lines = trace.read_text(errors="replace").splitlines()
    calls = parse_strace(lines)
    yield TracedRun(calls, trace, database, dimse, stow)


def test_each_c_store_rsp_follows_file_fsync_rename_dir_fsync_and_db_commit(traced: TracedRun) -> None:
    assert len(traced.dimse) == DIMSE_INSTANCES  # every acknowledged instance has its row and file
    steps = [
        durable_steps(traced.calls, uid, path, traced.database, is_c_store_rsp)
        for uid, path in traced.dimse.items()
    ]
    # One association: every answer went out on the same connection.
    assert len({s.answer.fd_path for s in steps}) == 1
    for s in steps:
        assert s.fsync_dir.fd_path == str(traced.dimse[s.sop_instance_uid].parent)


def test_stow_rs_http_200_follows_the_same_durable_steps_for_every_instance(traced: TracedRun) -> None:
    assert len(traced.stow) == STOW_INSTANCES

    # The response head goes out first on the request's connection; find that connection by the
    # response body, which lists every stored SOP Instance UID.
    body_sends = [
        c
        for c in traced.calls
        if c.name in _SENDS
        and (c.fd_path or "").startswith("TCP")
        and all(uid.encode() in c.data() for uid in traced.stow)
    ]
    assert body_sends, "no HTTP response listing the STOW-RS instances"
    connection = body_sends[0].fd_path
    head = min(
        (c for c in traced.calls if c.name in _SENDS and c.fd_path == connection),
        key=lambda c: c.entered,
    )
    assert head.data().startswith(b"HTTP/1.1 200"), head.brief()
    for uid, path in traced.stow.items():
        steps = durable_steps(traced.calls, uid, path, traced.database, lambda c, _: c is head)
        assert steps.answer is head


# -- the checker itself, on hand-written traces ---------------------------------------------------

_GOOD = """\
100 10:00:00.000001 write(12</s/incoming/tmpa.dcm>, "\\0\\0DICM", 6 <unfinished ...>
101 10:00:00.000001 mkdir("/s/instances/ab", 0777) = 0
101 10:00:00.000002 fsync(9</s/instances>) = 0
100 10:00:00.000003 <... write resumed>) = 6
101 10:00:00.000004 fsync(13</s/incoming/tmpa.dcm>) = 0
101 10:00:00.000005 rename("/s/incoming/tmpa.dcm", "/s/instances/ab/f.dcm") = 0
101 10:00:00.000006 fsync(13</s/instances/ab>) = 0
101 10:00:00.000007 pwrite64(4</s/node.db-wal>, "\\r\\0\\0\\0011.2.3.4.5\\0", 13, 0) = 13
101 10:00:00.000008 fdatasync(4</s/node.db-wal>) = 0
100 10:00:00.000009 sendto(11<TCP:[127.0.0.1:104->127.0.0.1:5000]>, "\\4\\0\\0\\0\\0\\2441.2.3.4.5\\0", 15, 0, NULL, 0) = 15
"""


def _check(trace: str) -> DurableSteps:
    calls = parse_strace(trace.splitlines())
    return durable_steps(
        calls, "1.2.3.4.5", Path("/s/instances/ab/f.dcm"), Path("/s/node.db"), is_c_store_rsp
    )


def test_checker_accepts_the_durable_order_across_threads_and_resumed_calls() -> None:
    steps = _check(_GOOD)
    assert steps.write.name == "write" and steps.write.entered == 0 and steps.write.returned == 3
    assert steps.answer.fd_path == "TCP:[127.0.0.1:104->127.0.0.1:5000]"
    assert steps.db_write.data() == b"\r\x00\x00\x011.2.3.4.5\x00"


@pytest.mark.parametrize(
    ("moved", "before", "complaint"),
    [
        # the answer goes out before the database fsync
        ("100 10:00:00.000009 sendto", "101 10:00:00.000008 fdatasync", "answered before"),
        # the directory is synced before the rename
        (
            "101 10:00:00.000006 fsync(13</s/instances/ab>",
            "101 10:00:00.000005 rename",
            "no fsync of the spool",
        ),
        # the row is committed before the file reaches the spool
        ("101 10:00:00.000007 pwrite64", "101 10:00:00.000004 fsync", "no database write"),
    ],
)
def test_checker_rejects_a_wrong_order(moved: str, before: str, complaint: str) -> None:
    lines = _GOOD.splitlines()
    line = next(x for x in lines if x.startswith(moved))
    lines.remove(line)
    lines.insert(next(i for i, x in enumerate(lines) if x.startswith(before)), line)
    with pytest.raises(AssertionError, match=complaint):
        _check("\n".join(lines))


@pytest.mark.parametrize(
    ("dropped", "complaint"),
    [
        ("fsync(13</s/incoming", "fsync of the temp file"),
        ("fsync(9</s/instances>", "fsync of the new directory's parent"),
        ("fdatasync", "database fsync"),
    ],
)
def test_checker_rejects_a_missing_sync(dropped: str, complaint: str) -> None:
    trace = "\n".join(x for x in _GOOD.splitlines() if dropped not in x)
    with pytest.raises(AssertionError, match=complaint):
        _check(trace)
