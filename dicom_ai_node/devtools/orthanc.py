"""A real Orthanc (Debian package) for the demo and tests: own directory, free loopback ports, DICOMweb,
Lua auto-forward.

Started through orthanc-dev/start-orthanc.sh, so the demo and the tests run exactly the configuration
developers use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.repo import checkout_file

START_SCRIPT = "orthanc-dev/start-orthanc.sh"
T = TypeVar("T")


class OrthancServer:
    """Orthanc in `workdir` on free loopback ports; `start()` returns once it answers (then `stop()`)."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC") -> None:
        self.dir = Path(workdir)
        self.aet = aet
        self.http_port = 0
        self.dicom_port = 0
        self.pid: int | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.dir / "orthanc.log"

    def start(self, node_aet: str, node_port: int, stable_age: int = 2) -> OrthancServer:
        """Start Orthanc forwarding each series stable for `stable_age` s to `node_aet`@127.0.0.1:`node_port`."""
        self.http_port, self.dicom_port = free_port(), free_port()
        proc = subprocess.run(
            [
                "bash",
                str(checkout_file(START_SCRIPT)),
                "--background",
                "--dir",
                str(self.dir),
                "--aet",
                self.aet,
                "--http-port",
                str(self.http_port),
                "--dicom-port",
                str(self.dicom_port),
                "--node-aet",
                node_aet,
                "--node-port",
                str(node_port),
                "--stable-age",
                str(stable_age),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"Orthanc did not start:\n{proc.stdout}\n{proc.stderr}")
        self.pid = int((self.dir / "orthanc.pid").read_text())
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST helpers ------------------------------------------------------------------------------

    def request(self, path: str, body: bytes | None = None, method: str | None = None) -> bytes:
        req = urllib.request.Request(
            self.http_url + path, data=body, method=method or ("POST" if body else "GET")
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def get_json(self, path: str) -> Any:
        return json.loads(self.request(path))

    def _lookup(self, uid: str, resource_type: str) -> str | None:
        hits = json.loads(self.request("/tools/lookup", uid.encode()))
        return next((h["ID"] for h in hits if h["Type"] == resource_type), None)

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of a study, by Study Instance UID (via /tools/lookup)."""
        return self._lookup(study_instance_uid, "Study")

    def find_series(self, series_instance_uid: str) -> str | None:
        """Orthanc's id of a series, by Series Instance UID (via /tools/lookup)."""
        return self._lookup(series_instance_uid, "Series")

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        return list(self.get_json("/studies"))

    def series_of_study(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        """Orthanc's /series JSON (MainDicomTags, Instances, IsStable...) of each series in the study."""
        return list(self.get_json(f"/studies/{orthanc_study_id}/series"))

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        """Instance metadata, e.g. RemoteAET (the calling AE that stored it; empty after STOW-RS)."""
        return dict(self.get_json(f"/instances/{instance_id}/metadata?expand"))

    def lua_log_lines(self) -> list[str]:
        """What the Lua scripts printed (Orthanc logs them as ``Lua says: ...``), oldest first."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line.split("Lua says: ", 1)[1] for line in lines if "Lua says: " in line]

    def wait_for(
        self, predicate: Callable[[], T | None], timeout_s: float, interval_s: float = 0.2, what: str = ""
    ) -> T:
        """Module `wait_for`, with Orthanc's log tail in the TimeoutError (where the reason usually is)."""
        try:
            return wait_for(predicate, timeout_s, interval_s, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; Orthanc log tail:\n{self.log_tail()}") from None

    def series_by_modality(self, study_instance_uid: str, modality: str) -> list[dict[str, Any]]:
        study = self.find_study(study_instance_uid)
        if study is None:
            return []
        series = self.series_of_study(study)
        return [s for s in series if s["MainDicomTags"].get("Modality") == modality]

    def download_instance(self, instance_id: str, dest: Path) -> Path:
        dest.write_bytes(self.request(f"/instances/{instance_id}/file"))
        return dest

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


def wait_for(
    predicate: Callable[[], T | None], timeout_s: float, interval_s: float = 0.5, what: str = ""
) -> T:
    """Poll `predicate` until it returns a truthy value (returned); TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(interval_s)
