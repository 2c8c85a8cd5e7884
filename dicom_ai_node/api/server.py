"""Run the admin app with uvicorn in a background thread of the node process."""

from __future__ import annotations

import socket
import threading

import uvicorn
from fastapi import FastAPI


def start_http(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """Bind first (in the caller's thread, so a busy port raises OSError here), then serve in a thread.

    uvicorn installs no signal handlers outside the main thread; the node's main thread handles them.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    return server
