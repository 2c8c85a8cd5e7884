"""docs/architecture.md's picture of the packages is the layers contract that lint-imports checks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
_MARKER = "<!-- layers:"


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [" ".join(layer.split()) for layer in layers["layers"]]


def _pictured_layers() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index(_MARKER) :].split("```text\n", 1)[1].split("```", 1)[0]
    layers = []
    for line in block.splitlines():
        if not line.strip() or line.strip() == "▼":
            continue
        # The layer, then two or more spaces, then a description.
        layers.append(" ".join(re.split(r"\s{2,}", line.strip())[0].split()))
    return layers


def test_picture_matches_the_layers_contract() -> None:
    assert _pictured_layers() == _contract_layers()


def test_every_package_and_top_level_module_is_in_the_picture() -> None:
    package = ROOT / "dicom_ai_node"
    names = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    pictured = {m for layer in _pictured_layers() for m in re.split(r"[|:]", layer.replace(" ", ""))}
    assert names == pictured
