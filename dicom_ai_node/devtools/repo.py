"""Where the source checkout is: the runners start orthanc-dev/start-orthanc.sh and read config/rules.yaml."""

from __future__ import annotations

from pathlib import Path

# dicom_ai_node/devtools/repo.py -> the checkout root (an editable install, as scripts/bootstrap.sh makes).
ROOT = Path(__file__).resolve().parents[2]


def checkout_file(relative: str) -> Path:
    """`relative` inside the checkout; FileNotFoundError when the package is not run from a checkout."""
    path = ROOT / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the dev tools need the source checkout (pip install -e . in a git clone)"
        )
    return path
