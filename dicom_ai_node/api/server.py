"""Run the admin app with uvicorn in a background thread of the node process."""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI


def start_http(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    # Signals are handled by the node's main thread, not uvicorn.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server
