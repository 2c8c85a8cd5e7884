"""The OHIF viewer (prebuilt @ohif/app dist) served same-origin with Orthanc's DICOMweb, and a headless
Chromium driver for it (tests/support/ohif_driver.mjs, playwright-core + Debian chromium).

Installed by ``scripts/fetch-ohif.sh`` into ``$AINODE_OHIF_DIR`` or ``~/.cache/dicom-ai-node/ohif``
(``dist/`` and ``node_modules/playwright-core``) and ``apt-get install chromium``.

One loopback HTTP server in a thread serves the app (unknown paths fall back to index.html, OHIF routes
client side), a generated ``/app-config.js``, and proxies ``/dicom-web`` and ``/wado`` to Orthanc so the
browser sees a single origin (no CORS; Orthanc builds BulkDataURIs from the forwarded Host header).
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
DRIVER_SCRIPT = Path(__file__).with_name("ohif_driver.mjs")
CHROMIUM = Path("/usr/bin/chromium")
PROXIED_PREFIXES = ("/dicom-web", "/wado")
# Headers that belong to one hop only (RFC 9110 7.6.1); never copied through the proxy.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
_CONTENT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}


class OhifMissingError(RuntimeError):
    """A piece of the viewer check is not installed; the message names the install step."""


def ohif_cache_dir() -> Path:
    """``$AINODE_OHIF_DIR`` or ``~/.cache/dicom-ai-node/ohif`` (filled by scripts/fetch-ohif.sh)."""
    env = os.environ.get("AINODE_OHIF_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dicom-ai-node" / "ohif"


def check_installed(cache: Path | None = None) -> Path:
    """The cache dir, or OhifMissingError saying exactly which install step is missing."""
    cache = cache or ohif_cache_dir()
    problems = []
    if not (cache / "dist" / "index.html").is_file():
        problems.append(f"OHIF bundle missing ({cache}/dist/index.html): run scripts/fetch-ohif.sh")
    if not (cache / "node_modules" / "playwright-core" / "package.json").is_file():
        problems.append(f"playwright-core missing ({cache}/node_modules): run scripts/fetch-ohif.sh")
    if not CHROMIUM.is_file():
        problems.append(f"{CHROMIUM} missing: apt-get install chromium")
    if shutil.which("node") is None:
        problems.append("node missing: apt-get install nodejs")
    if problems:
        raise OhifMissingError("viewer check cannot run:\n  " + "\n  ".join(problems))
    return cache


def app_config_js(origin: str) -> str:
    """OHIF's window.config: one DICOMweb data source at the proxied root, no prompts or dialogs.

    ``disableConfirmationPrompts`` makes OHIF hydrate a SEG without asking; the investigational-use
    dialog would cover the viewport in every screenshot.
    """
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": "orthanc",
            "wadoUriRoot": f"{origin}/wado",
            "qidoRoot": f"{origin}/dicom-web",
            "wadoRoot": f"{origin}/dicom-web",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "disableConfirmationPrompts": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [data_source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _Handler(BaseHTTPRequestHandler):
    server: _OhifHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # hundreds of requests per page load; the driver reports failures that matter

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith(PROXIED_PREFIXES):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, self.server.app_config.encode(), "text/javascript")
        else:
            self._static(path)

    def do_POST(self) -> None:
        if urlsplit(self.path).path.startswith(PROXIED_PREFIXES):
            self._proxy()
        else:
            self._send(405, b"", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _static(self, path: str) -> None:
        dist = self.server.dist
        candidate = (dist / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(dist) or not candidate.is_file():
            candidate = dist / "index.html"  # SPA fallback: /viewer etc. are client-side routes
        content_type = _CONTENT_TYPES.get(candidate.suffix) or (
            mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        )
        self._send(200, candidate.read_bytes(), content_type)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._send(502, f"Orthanc unreachable: {exc}".encode(), "text/plain")
            return
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _OhifHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.app_config = app_config_js(f"http://127.0.0.1:{self.server_address[1]}")

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The driver closes a browser context with requests in flight (a viewer opened again): the
        # browser hung up, nothing failed on our side.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class OhifServer:
    """OHIF + proxied Orthanc DICOMweb on one free loopback port, served from a daemon thread."""

    def __init__(self, orthanc_http_port: int, cache: Path | None = None) -> None:
        self.cache = check_installed(cache)
        self._httpd = _OhifHTTPServer(self.cache / "dist", orthanc_http_port)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class ViewerCapture:
    """What the driver saw: screenshots of one slice with and without the SEG, and where it was."""

    with_seg: Path
    without_seg: Path
    sop_instance_uid: str  # the source image shown in both screenshots
    image_index: int  # its index in the viewport's stack
    # Canvas pixel (x, y) of the centres of the image's corner pixels, keys "tlhc", "trhc", "blhc"
    # (row 0 col 0, row 0 last col, last row col 0), in screenshot pixels.
    corners: dict[str, tuple[float, float]]
    report: dict[str, Any]


def capture_seg_slice(
    server: OhifServer,
    study_instance_uid: str,
    seg_series_instance_uid: str,
    target_sop_instance_uid: str,
    out_dir: Path,
    *,
    timeout_s: float = 200,
) -> ViewerCapture:
    """Open the SEG in OHIF, wheel-scroll to the target source image, screenshot with and without SEG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = {
        "url": server.url,
        "studyInstanceUID": study_instance_uid,
        "segSeriesInstanceUID": seg_series_instance_uid,
        "targetSOPInstanceUID": target_sop_instance_uid,
        "outDir": str(out_dir),
        "chromium": str(CHROMIUM),
        "cacheDir": str(server.cache),
        "timeoutMs": int(timeout_s * 1000),
    }
    proc = subprocess.run(
        ["node", str(DRIVER_SCRIPT), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    report_path = out_dir / "report.json"
    if proc.returncode != 0 or not report_path.is_file():
        raise RuntimeError(
            f"OHIF driver failed ({proc.returncode}); screenshots so far in {out_dir}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    report = json.loads(report_path.read_text())
    return ViewerCapture(
        with_seg=out_dir / "with-seg.png",
        without_seg=out_dir / "without-seg.png",
        sop_instance_uid=report["sopInstanceUID"],
        image_index=int(report["imageIndex"]),
        corners={k: (float(v[0]), float(v[1])) for k, v in report["corners"].items()},
        report=report,
    )
