"""A small TorchScript chest-radiograph "classifier" made in the tests, with its manifest.

It is not a medical model: it scores the mean normalised intensity of the image, so a bright and a dark
synthetic CR give predictably different probabilities. What it exercises is real: a user TorchScript
model loaded from a model directory by its manifest (sha256 checked), the 2-D input path (resize,
intensity window), the findings with SNOMED codes and thresholds, and the SR the node writes.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import yaml

MODEL_NAME = "cxr-demo"


class _MeanIntensityClassifier(torch.nn.Module):
    """(N, 1, H, W) in [0, 1] -> (N, 2): [p(pneumothorax), p(pleural effusion)], both from the mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        first = torch.sigmoid(12.0 * (mean - 0.4))
        return torch.stack([first, 1.0 - first], dim=1)


def expected_probability(mean_normalised: float) -> float:
    return float(torch.sigmoid(torch.tensor(12.0 * (mean_normalised - 0.4))))


def write_torchscript_classifier(models_dir: Path, name: str = MODEL_NAME) -> Path:
    """Write `<models_dir>/<name>/{model.ts, manifest.yaml}` and return the model directory."""
    model_dir = models_dir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; users still ship it
        scripted = torch.jit.script(_MeanIntensityClassifier())
        scripted.save(str(model_dir / "model.ts"))
    digest = hashlib.sha256((model_dir / "model.ts").read_bytes()).hexdigest()
    manifest = {
        "name": name,
        "version": "0.1.0",
        "task": "classification",
        "format": "torchscript",
        "description": "test classifier: mean intensity (not a medical model)",
        "accepts": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
        "input": {"size": [64, 64], "intensity": {"window": [0, 4095], "normalise": "minmax"}},
        "outputs": {
            "activation": "none",
            "findings": [
                {"index": 0, "finding": {"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}},
                {
                    "index": 1,
                    "finding": {"value": "60046008", "scheme": "SCT", "meaning": "Pleural effusion"},
                    "threshold": 0.7,
                },
            ],
        },
        "weights": [{"file": "model.ts", "sha256": digest}],
        "licence": "Apache-2.0 (made by the test)",
        "training_data": "none: a fixed formula",
        "intended_use": "tests only",
    }
    (model_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return model_dir
