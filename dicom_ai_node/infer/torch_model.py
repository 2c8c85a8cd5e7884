"""A PyTorch network described by a manifest (monai-unet state_dict or TorchScript), run on a Volume.

Segmentation: source grid -> model grid (grid.to_model_grid) -> MONAI sliding-window inference ->
activation -> back to the exact source grid (grid.labels_to_source_grid). Classification: the input
is resized to input.size (2-D: the middle frame; 3-D: the whole volume) and the outputs become one
probability per finding.

The network is loaded once, verified against the manifest's sha256 first, and kept warm. Calls are
serialised per model: one inference at a time keeps peak memory predictable on small servers.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import torch

from dicom_ai_node.domain.results import FindingResult, FindingSpec, ModelIdentity, SegmentSpec
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.grid import frame_image, labels_to_source_grid, to_model_grid
from dicom_ai_node.infer.manifest import ModelManifest, verify_weights
from dicom_ai_node.infer.volume import Volume

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """'auto' -> cuda when usable, else cpu; 'cuda' without a usable GPU falls back to cpu with a warning.

    torch.cuda.is_available() answers at once on machines without a driver, so this never hangs.
    """
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested.startswith("cuda"):
        log.warning("device %s requested but no usable GPU: running on cpu", requested)
    return "cpu"


def load_network(manifest: ModelManifest, device: str) -> torch.nn.Module:
    """Build and load the network; refuses weights whose sha256 differs from the manifest."""
    problems = verify_weights(manifest)
    if problems:
        raise InferenceError(f"model {manifest.name}: weights not verified: {'; '.join(problems)}")
    path = manifest.weights_path(manifest.weights[0])
    if manifest.format == "monai-unet":
        from monai.networks.nets import UNet

        network: torch.nn.Module = UNet(**manifest.network)
        # weights_only: a state_dict is tensors only, so a tampered file cannot run code on load.
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    elif manifest.format == "torchscript":
        network = load_torchscript(path)
    else:
        raise InferenceError(f"model {manifest.name}: format {manifest.format} is not a plain network")
    return network.to(device).eval()


def load_torchscript(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit.load in favour of torch.export; TorchScript is what users have.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        module: torch.nn.Module = torch.jit.load(str(path), map_location="cpu")
    return module


def activate(logits: torch.Tensor, activation: str, dim: int) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(logits, dim=dim)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return logits


class _ManifestNetwork:
    """What both tasks share: the warm network on its device, identity from the manifest, one lock."""

    def __init__(self, manifest: ModelManifest, network: torch.nn.Module, device: str) -> None:
        self.manifest = manifest
        self.network = network
        self.device = device
        self.identity = ModelIdentity(manifest.name, manifest.version, description=manifest.description)
        self.accepts_modalities = tuple(manifest.accepts.modalities)
        # One inference at a time per model keeps peak memory predictable on small servers.
        self._lock = threading.Lock()

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, device: str = "auto") -> Self:
        resolved = resolve_device(device)
        return cls(manifest, load_network(manifest, resolved), resolved)


class ManifestSegmentationModel(_ManifestNetwork):
    """A segmentation network run with sliding-window inference over the manifest's model grid."""

    task: Literal["segmentation"] = "segmentation"

    def __init__(self, manifest: ModelManifest, network: torch.nn.Module, device: str) -> None:
        super().__init__(manifest, network, device)
        self.segments: list[SegmentSpec] = manifest.segment_specs

    def probabilities(self, prepared: np.ndarray) -> np.ndarray:
        """Per-class probabilities (C, x, y, z) for a prepared (channels, x, y, z) array."""
        from monai.inferers import sliding_window_inference

        spec = self.manifest.inference
        inputs = torch.from_numpy(prepared)[None]
        # Patches run on the model's device; the stitched output stays on the CPU so a long series
        # does not need its whole probability map in GPU memory.
        with torch.inference_mode():
            if spec.roi_size is None:
                logits = self.network(inputs.to(self.device)).cpu()
            else:
                logits = sliding_window_inference(
                    inputs,
                    roi_size=spec.roi_size,
                    sw_batch_size=spec.sw_batch_size,
                    predictor=self.network,
                    overlap=spec.overlap,
                    mode=spec.mode,
                    sw_device=self.device,
                    device="cpu",
                )
            assert isinstance(logits, torch.Tensor)
            probabilities = activate(logits, self.manifest.outputs.activation, dim=1)[0]
        if self.manifest.outputs.activation == "sigmoid":
            # Multi-label channels without a background channel: background = 1 - max(foreground).
            background = 1.0 - probabilities.max(dim=0, keepdim=True).values
            probabilities = torch.cat([background, probabilities])
        return probabilities.numpy()

    def segment(self, volume: Volume) -> np.ndarray:
        prepared, grid = to_model_grid(volume, self.manifest.input)
        with self._lock:
            probabilities = self.probabilities(prepared)
        return labels_to_source_grid(probabilities, grid, [s.label_value for s in self.segments])


class ManifestClassificationModel(_ManifestNetwork):
    """A classifier: one forward pass over the resized input, one probability per manifest finding."""

    task: Literal["classification"] = "classification"

    def __init__(self, manifest: ModelManifest, network: torch.nn.Module, device: str) -> None:
        super().__init__(manifest, network, device)
        self.findings: list[FindingSpec] = manifest.finding_specs

    def classify(self, volume: Volume) -> list[FindingResult]:
        spec = self.manifest.input
        if spec.size is not None and len(spec.size) == 2:
            prepared = frame_image(volume, spec)
        else:
            prepared, _ = to_model_grid(volume, spec)
        with self._lock, torch.inference_mode():
            output = self.network(torch.from_numpy(prepared)[None].to(self.device))
            probabilities = activate(output.float(), self.manifest.outputs.activation, dim=1)[0].cpu()
        return findings_from_vector(probabilities.numpy(), self.manifest)


def findings_from_vector(vector: np.ndarray, manifest: ModelManifest) -> list[FindingResult]:
    flat = np.asarray(vector, dtype=np.float64).reshape(-1)
    results: list[FindingResult] = []
    for out in sorted(manifest.outputs.findings, key=lambda f: f.index):
        if out.index >= flat.size:
            raise InferenceError(
                f"model {manifest.name}: output has {flat.size} values, finding needs index {out.index}"
            )
        probability = float(flat[out.index])
        if not 0.0 <= probability <= 1.0 or np.isnan(probability):
            raise InferenceError(
                f"model {manifest.name}: probability {probability} outside 0..1 (check outputs.activation)"
            )
        results.append(FindingResult(out.spec(), probability))
    return results


def build_from_manifest(manifest: ModelManifest, device: str = "auto") -> Any:
    """The warm model object for a monai-unet or torchscript manifest."""
    if manifest.task == "segmentation":
        return ManifestSegmentationModel.from_manifest(manifest, device)
    return ManifestClassificationModel.from_manifest(manifest, device)
