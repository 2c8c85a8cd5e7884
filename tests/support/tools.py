"""Tools and data the README's install step provides: fail (never skip) when they are missing in CI.

`scripts/test.sh` (the README's test command, which CI runs) installs every one of them and exports
AINODE_STRICT_TOOLS=1, so a missing one there is a broken install step, not a reason to skip checks.
Anywhere else (a developer's partial setup) the test is skipped, and the skip says what to install.
"""

from __future__ import annotations

import os
import shutil

import pytest


def strict() -> bool:
    return os.environ.get("AINODE_STRICT_TOOLS") == "1" or bool(os.environ.get("CI"))


def require(available: bool, what: str, install: str) -> None:
    """Fail in CI, skip elsewhere, when `what` is not `available`; the message says how to install it."""
    if available:
        return
    message = f"{what} is missing: {install}"
    if strict():
        pytest.fail(f"{message} (the README's install step provides it; CI must not skip)", pytrace=False)
    pytest.skip(message)


def require_executable(name: str, install: str) -> str:
    """The path of executable `name` (see `require`)."""
    path = shutil.which(name)
    require(path is not None, f"executable {name!r}", install)
    assert path is not None
    return path
