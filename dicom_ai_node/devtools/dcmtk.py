"""DCMTK peers for the demo, tests and benchmarks: storescu (sender) and storescp (a minimal PACS that
writes files).

Debian's DCMTK leaves Nagle on; TCP_NODELAY=1 avoids the ~45 ms stall per C-STORE response.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_ai_node.devtools.ports import free_port, wait_port

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def dcmtk_tool(name: str) -> str:
    """The DCMTK program `name`, never pynetdicom's same-named console script in an activated venv.

    pynetdicom installs its own storescu, storescp, findscu... into the environment's bin directory;
    with the venv activated they come first on PATH and take other options.
    """
    venv_bin = Path(sys.prefix, "bin").resolve()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if directory and Path(directory).resolve() != venv_bin:
            found = shutil.which(name, path=directory)
            if found:
                return found
    raise FileNotFoundError(f"DCMTK {name} not found: apt-get install dcmtk (scripts/bootstrap.sh does)")


@contextmanager
def storescp(out_dir: Path, aet: str = "PACS") -> Iterator[int]:
    """A DCMTK storescp writing every received instance into `out_dir`; yields its port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk_tool("storescp"), "-aet", aet, "-od", str(out_dir), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait()


def storescu(
    files: list[Path], aet_called: str, port: int, calling_aet: str = "STORESCU", *extra: str
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu; raises RuntimeError with its output on a non-zero exit."""
    proc = subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            calling_aet,
            "-aec",
            aet_called,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
