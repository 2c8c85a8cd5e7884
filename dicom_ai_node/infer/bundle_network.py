"""A MONAI bundle's network, loaded once by the node from the file whose sha256 was verified.

`monai.bundle.ConfigWorkflow` parses the bundle's configs/inference.json; before the workflow is
initialised these functions point it at the bundle itself, the node's device and scratch directories
(`override_paths`), remove its CheckpointLoader handlers (`remove_checkpoint_loaders`), load the pinned
network (a state_dict with weights_only=True into the bundle's `network_def`, or the TorchScript
archive: `load_network`) and put that instance where the evaluator takes it from (`install_network`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dicom_ai_node.errors import ConfigError, InferenceError
from dicom_ai_node.infer.bundle_manifest import NETWORK_FILES, pinned_network
from dicom_ai_node.infer.manifest import MANIFEST_FILE, ModelManifest

log = logging.getLogger(__name__)


def network_path(manifest: ModelManifest) -> Path:
    """The pinned network file, else the bundle's own (model.pt before model.ts), with a warning."""
    assert manifest.directory is not None
    pinned = pinned_network(manifest)
    if pinned is not None:
        return manifest.weights_path(pinned)
    for name in NETWORK_FILES:
        candidate = manifest.directory / name
        if candidate.is_file():
            log.warning(
                "MONAI bundle %s: %s has no sha256 pinned in %s; loading it unverified (`models verify` "
                "refuses this bundle)",
                manifest.name,
                name,
                MANIFEST_FILE,
            )
            return candidate
    raise InferenceError(f"model {manifest.name}: the bundle has no {' or '.join(NETWORK_FILES)}")


def override_paths(parser: Any, bundle: Path, workdir: Path, device: str) -> None:
    """Point the bundle at itself, the node's device and the node's scratch directories."""
    import torch

    parser["bundle_root"] = str(bundle)
    parser["device"] = torch.device(device)
    parser["dataset_dir"] = str(workdir / "in")
    parser["output_dir"] = str(workdir / "out")
    if "datalist" in parser:
        # The instantiated loader is replaced per series: it must not glob anything at load.
        parser["datalist"] = []
    if (
        "dataloader" in parser
        and isinstance(parser["dataloader"], dict)
        and "num_workers" in parser["dataloader"]
    ):
        parser["dataloader::num_workers"] = 0


def remove_checkpoint_loaders(parser: Any) -> list[str]:
    """Drop CheckpointLoader handlers from the config; return the load_dict keys they used.

    The node loads the sha256-verified file itself, once; a CheckpointLoader would read the file again
    at every run (and a model.ts-only bundle's loader points at a model.pt that is not there).
    """
    keys: list[str] = []

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, list):
            kept = []
            for item in node:
                target = item.get("_target_") if isinstance(item, dict) else None
                if isinstance(target, str) and target.rsplit(".", 1)[-1] == "CheckpointLoader":
                    load_dict = item.get("load_dict")
                    if isinstance(load_dict, dict):
                        keys.extend(str(k) for k in load_dict)
                    continue
                kept.append(strip(item))
            return kept
        return node

    parser.set(strip(parser.get()))
    return keys


def load_network(parser: Any, network_file: Path, checkpoint_keys: list[str], device: str) -> Any:
    import torch

    from dicom_ai_node.infer.torch_model import load_torchscript

    if network_file.suffix == ".ts":
        network: Any = load_torchscript(network_file)
    else:
        if "network_def" not in parser:
            raise ConfigError(
                f"{network_file.parent.parent}: configs/inference.json",
                "a bundle with models/model.pt needs network_def (or ship models/model.ts)",
            )
        network = parser.get_parsed_content("network_def")
        # weights_only: a state_dict is tensors only, so a tampered file cannot run code on load.
        checkpoint = torch.load(network_file, map_location="cpu", weights_only=True)
        network.load_state_dict(_state_dict(checkpoint, checkpoint_keys))
    return network.to(device).eval()


def _state_dict(checkpoint: Any, keys: list[str]) -> Any:
    """The network's state_dict inside a checkpoint, the way MONAI's CheckpointLoader finds it."""
    if isinstance(checkpoint, dict):
        for key in (*keys, "model", "state_dict"):
            inner = checkpoint.get(key)
            if isinstance(inner, dict):
                return inner
    return checkpoint


def install_network(parser: Any, network: Any) -> None:
    """Put the loaded network where the evaluator takes it from (`@network` or its own argument)."""
    evaluator = parser["evaluator"] if "evaluator" in parser else None
    if not isinstance(evaluator, dict):
        raise ConfigError("configs/inference.json: evaluator", "the bundle needs an evaluator to run")
    reference = evaluator.get("network")
    if isinstance(reference, str) and reference.startswith("@") and reference[1:] in parser:
        parser[reference[1:]] = network
    else:
        parser["evaluator::network"] = network
    if "network" in parser:
        # Anything else that refers to @network (custom handlers) gets the same warm instance.
        parser["network"] = network
