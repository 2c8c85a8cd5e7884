"""Run the admin app with uvicorn in a background thread of the node process."""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI


def start_http(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers outside the main thread; the node's main thread handles them.
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server
