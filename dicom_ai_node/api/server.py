"""Run the admin app with uvicorn in a background thread of the node process."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


def start_http(
    app: FastAPI,
    host: str,
    port: int,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> uvicorn.Server:
    """Bind first (in the caller's thread, so a busy port raises OSError here), then serve in a thread.

    With `tls_cert` and `tls_key` the server speaks HTTPS only (TLS 1.2 or newer, BCP 195); a bad
    certificate or key raises ssl.SSLError / OSError here, before anything listens.
    uvicorn installs no signal handlers outside the main thread; the node's main thread handles them.
    """
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        # X-Forwarded-For is believed only when the TCP peer is this host (a local reverse proxy);
        # anything else is the real peer address. Without this, every client of a local proxy would
        # look like loopback, which /metrics lets in.
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1,::1",
    )
    config.load()  # builds the SSL context now, so a broken certificate fails the start, not a thread
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    return server
