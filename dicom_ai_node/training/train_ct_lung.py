"""Seeded, reproducible training of the built-in `ct-lung` model (a MONAI 3-D UNet, right and left lung).

    dicom-ai-node train ct-lung --out build/ct-lung --seed 0

Data: synthetic chest phantoms (dicom_ai_node.training.phantoms, exact labels) and the two real chest CTs
reachable here (pyradiomics lung1/lung2 with the reference masks in tests/data/references). Every case is
put on the model grid by dicom_ai_node.infer.grid.to_model_grid with the manifest's InputSpec, the very
function the node runs before inference, so training and production see identical grids and intensities;
labels go onto that grid with label_map_to_model_grid.

Sampling: each step draws `batch` random crops; a crop comes from a real CT with probability
`real_fraction` (the real cases are few but matter most), else from a phantom. Augmentation: small
isotropic scaling (0.9-1.1), intensity gain/offset and noise. No left-right flips: flipping an array
would turn a left lung into a right one in patient terms (the labels would have to swap and the heart
would sit on the wrong side), and the grid is already in RAS, so the network learns true patient sides.

Reproducibility: numpy and torch are seeded from `seed`, the data order comes from one numpy Generator,
torch runs with 2 threads and deterministic algorithms; on the same CPU type the same command gives the
same weights bit for bit (other CPUs may differ in float rounding).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from dicom_ai_node.infer.grid import label_map_to_model_grid, to_model_grid
from dicom_ai_node.infer.manifest import MANIFEST_FILE, InferenceSpec, InputSpec, Intensity, sha256_of
from dicom_ai_node.infer.volume import Volume
from dicom_ai_node.training.data import REAL_CASES, REFERENCES_DIR, load_real_ct, load_reference
from dicom_ai_node.training.phantoms import make_phantom

MODEL_NAME = "ct-lung"
MODEL_VERSION = "1.0.0"
WEIGHTS_FILE = "model.pt"
# 2 x 2 x 3 mm: lungs are large, so the grid costs little Dice (a one-hot reference taken to this grid
# and back keeps Dice >= 0.987 on lung1/lung2) and a 512 x 512 x 300 CT becomes ~180 x 180 x 100
# voxels, one sliding window on two CPU cores. Window [-1000, 400] HU: air to soft tissue and some bone.
INPUT_SPEC = InputSpec(
    orientation="RAS",
    spacing_mm=(2.0, 2.0, 3.0),
    intensity=Intensity(window=(-1000.0, 400.0), normalise="minmax"),
)
# One window covers a whole chest at 2 mm (384 x 384 x 336 mm); BatchNorm (not InstanceNorm) so
# a window larger than the training crops is normalised with the same (running) statistics.
INFERENCE_SPEC = InferenceSpec(roi_size=(192, 192, 112), overlap=0.25, sw_batch_size=1, mode="gaussian")
NETWORK: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [8, 16, 32, 64, 128],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}
DEFAULT_ITERATIONS = 1600
DEFAULT_PHANTOMS = 24


@dataclass
class TrainingCase:
    """One case on the model grid: image (1, x, y, z) float32 and labels (x, y, z) uint8."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    real: bool
    foreground: np.ndarray = field(init=False)  # (n, 3) voxel indices of lung, subsampled

    def __post_init__(self) -> None:
        self.foreground = np.argwhere(self.labels > 0)[::97]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    iterations: int = DEFAULT_ITERATIONS
    phantoms: int = DEFAULT_PHANTOMS
    phantom_matrix: int = 512
    real_cases: tuple[str, ...] = REAL_CASES
    real_fraction: float = 0.5
    batch: int = 2
    crop: tuple[int, int, int] = (160, 128, 32)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    foreground_fraction: float = 0.8
    network: dict[str, Any] = field(default_factory=lambda: dict(NETWORK))
    threads: int = 2


def prepare_case(name: str, volume: Volume, label_map: np.ndarray, real: bool) -> TrainingCase:
    """A volume and its source-grid label map on the model grid, exactly as the node prepares input."""
    image, grid = to_model_grid(volume, INPUT_SPEC)
    return TrainingCase(name, image, label_map_to_model_grid(label_map, grid), real)


def phantom_seed(seed: int, index: int) -> int:
    """Phantom seeds of a training run: disjoint from the held-out ones (>= 1_000_000)."""
    return seed * 10_000 + index


HELD_OUT_PHANTOM_SEEDS = tuple(1_000_000 + k for k in range(4))


def load_cases(
    config: TrainConfig, log: Callable[[str], None], references_dir: Path = REFERENCES_DIR
) -> list[TrainingCase]:
    cases: list[TrainingCase] = []
    for case in config.real_cases:
        cases.append(prepare_case(case, load_real_ct(case), load_reference(case, references_dir), real=True))
        log(f"real {case}: model grid {cases[-1].image.shape[1:]}")
    for index in range(config.phantoms):
        seed = phantom_seed(config.seed, index)
        phantom = make_phantom(seed, matrix=config.phantom_matrix)
        cases.append(prepare_case(f"phantom-{seed}", phantom.volume, phantom.labels, real=False))
    log(f"{config.phantoms} phantoms prepared")
    return cases


def _random_crop(
    case: TrainingCase, config: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A crop of `config.crop` voxels, scaled by 0.9-1.1, intensity-jittered; pads with air/background."""
    scale = rng.uniform(0.9, 1.1)
    size = np.array([max(8, round(c * scale)) for c in config.crop])
    shape = np.array(case.labels.shape)
    if len(case.foreground) and rng.random() < config.foreground_fraction:
        centre = case.foreground[rng.integers(len(case.foreground))]
    else:
        centre = np.array([rng.integers(n) for n in shape])
    # Jitter the centre, then keep the crop inside the image where the image is larger than the crop.
    centre = centre + rng.integers(-size // 4, size // 4 + 1)
    start = np.where(
        shape >= size, np.clip(centre - size // 2, 0, np.maximum(shape - size, 0)), (shape - size) // 2
    )
    image = np.zeros((1, *size), dtype=np.float32)  # 0 = -1000 HU after minmax: air
    labels = np.zeros(tuple(size), dtype=np.uint8)
    src = tuple(slice(max(0, s), min(n, s + c)) for s, n, c in zip(start, shape, size, strict=True))
    dst = tuple(
        slice(max(0, -s), max(0, -s) + (sl.stop - sl.start)) for s, sl in zip(start, src, strict=True)
    )
    image[(slice(None), *dst)] = case.image[(slice(None), *src)]
    labels[dst] = case.labels[src]
    if tuple(size) != config.crop:
        image_t = F.interpolate(
            torch.from_numpy(image)[None], size=config.crop, mode="trilinear", align_corners=False
        )
        labels_t = F.interpolate(
            torch.from_numpy(labels)[None, None].float(), size=config.crop, mode="nearest-exact"
        )
        image, labels = image_t[0].numpy(), labels_t[0, 0].numpy().astype(np.uint8)
    gain, offset, noise = rng.uniform(0.92, 1.08), rng.uniform(-0.02, 0.02), rng.uniform(0, 0.015)
    image = image * np.float32(gain) + np.float32(offset)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
    np.clip(image, 0.0, 1.0, out=image)
    return image, labels


def _sample_batch(
    cases: Sequence[TrainingCase], config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    real = [c for c in cases if c.real]
    synthetic = [c for c in cases if not c.real]
    images, labels = [], []
    for _ in range(config.batch):
        pool = real if real and (not synthetic or rng.random() < config.real_fraction) else synthetic
        image, label = _random_crop(pool[rng.integers(len(pool))], config, rng)
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)[:, None].astype(np.int64))


def build_network(network: dict[str, Any]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(**network)


def train_network(
    cases: Sequence[TrainingCase], config: TrainConfig, log: Callable[[str], None] = print
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train a UNet on `cases`; returns it (eval mode) and the loss history."""
    from monai.losses import DiceCELoss

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(config.seed)
    network = build_network(config.network)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(1, config.iterations // 30)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.iterations))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    # batch=True: Dice over the whole batch, so a crop without one of the lungs does not blow up.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    network.train()
    running = 0.0
    for step in range(config.iterations):
        images, labels = _sample_batch(cases, config, rng)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(network(images), labels)
        loss.backward()
        optimiser.step()
        scheduler.step()
        running += float(loss.detach())
        if (step + 1) % 25 == 0 or step + 1 == config.iterations:
            count = (step % 25) + 1
            entry = {"step": step + 1, "loss": running / count, "seconds": time.monotonic() - started}
            history.append(entry)
            log(f"step {step + 1}/{config.iterations} loss {entry['loss']:.4f} {entry['seconds']:.0f} s")
            running = 0.0
    return network.eval(), history


def training_command(config: TrainConfig) -> str:
    command = f"dicom-ai-node train ct-lung --out <dir> --seed {config.seed} --iterations {config.iterations}"
    if config.phantoms != DEFAULT_PHANTOMS:
        command += f" --phantoms {config.phantoms}"
    if config.real_cases != REAL_CASES:
        command += "".join(f" --real {c}" for c in config.real_cases) or " --no-real"
    return command


def manifest_dict(config: TrainConfig, sha256: str, limits: str = "") -> dict[str, Any]:
    """The manifest of a trained model: what it is, how its input is prepared, where its data came from."""
    real = ", ".join(config.real_cases) or "none"
    return {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "task": "segmentation",
        "format": "monai-unet",
        "description": "3-D UNet (MONAI) trained in this repository: right and left lung on chest CT",
        "accepts": {"modalities": ["CT"], "body_parts": ["CHEST", "THORAX", "LUNG"]},
        "input": json.loads(INPUT_SPEC.model_dump_json()),
        "inference": json.loads(INFERENCE_SPEC.model_dump_json()),
        "outputs": {
            "activation": "softmax",
            "segments": [
                {
                    "value": 1,
                    "label": "Right lung",
                    "type": {"value": "3341006", "scheme": "SCT", "meaning": "Right lung"},
                    "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
                    "colour": [80, 180, 250],
                },
                {
                    "value": 2,
                    "label": "Left lung",
                    "type": {"value": "44029006", "scheme": "SCT", "meaning": "Left lung"},
                    "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
                    "colour": [250, 200, 80],
                },
            ],
        },
        "weights": [{"file": WEIGHTS_FILE, "sha256": sha256}],
        "network": dict(config.network),
        "licence": "Apache-2.0 (weights trained in this repository from the data in training_data)",
        "training_data": (
            f"{config.phantoms} synthetic chest CT phantoms (dicom_ai_node/training/phantoms.py, seeds "
            f"{phantom_seed(config.seed, 0)}..{phantom_seed(config.seed, config.phantoms - 1)}, exact labels) and "
            f"the real chest CTs {real} (crops drawn from them with probability {config.real_fraction}): "
            "pyradiomics 3.0.1 source distribution, data/lung1_image.nrrd and data/lung2_image.nrrd "
            "(BSD-3-Clause, Copyright 2017 Harvard Medical School; pyradiomics' test cases, two adult "
            "chest CTs with a lung tumour each, 512 x 512 x 48 and 61 slices of 5 mm; the sdist does not "
            "state where the scans come from), with reference masks built by dicom_ai_node/training/references.py (classical "
            "baseline plus the pyradiomics tumour label, checked by eye: docs/images/ct-lung-reference-*.png). "
            f"Trained with `{training_command(config)}` ({config.iterations} steps of {config.batch} crops "
            f"{list(config.crop)}, AdamW lr {config.learning_rate}, DiceCE loss)."
        ),
        "intended_use": (
            "Right and left lung masks and volumes on chest CT (adult, axial, 1-5 mm slices), as an "
            "overlay and for lung volumes next to the classical baseline ct-lung-classical. Not a "
            "diagnostic device."
        ),
        "limits": limits
        or (
            "Trained on synthetic phantoms and only two real chest CTs, both also used for training: "
            "its accuracy on other patients, scanners, children, severe disease (consolidation, "
            "effusion, collapse) or contrast phases is unknown."
        ),
    }


def write_model(out_dir: Path, network: torch.nn.Module, config: TrainConfig, limits: str = "") -> Path:
    """Write model.pt (state_dict) and manifest.yaml (with its sha256) into out_dir; returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in network.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS_FILE)
    write_manifest(out_dir, config, limits)
    return out_dir


def write_manifest(out_dir: Path, config: TrainConfig, limits: str = "") -> Path:
    """(Re)write manifest.yaml for the model.pt in out_dir, e.g. to add evaluation results to `limits`."""
    manifest = manifest_dict(config, sha256_of(out_dir / WEIGHTS_FILE), limits)
    header = (
        "# ct-lung: a MONAI 3-D UNet trained in this repository (dicom_ai_node/training/train_ct_lung.py).\n"
        "# Written by the training run; the sha256 is of model.pt next to this file.\n"
    )
    text = yaml.safe_dump(manifest, sort_keys=False, width=100, allow_unicode=True, default_flow_style=None)
    path = out_dir / MANIFEST_FILE
    path.write_text(header + text, encoding="utf-8")
    return path


def train_ct_lung(
    out_dir: Path,
    seed: int = 0,
    iterations: int = DEFAULT_ITERATIONS,
    *,
    phantoms: int = DEFAULT_PHANTOMS,
    real_cases: Sequence[str] = REAL_CASES,
    network: dict[str, Any] | None = None,
    crop: tuple[int, int, int] | None = None,
    phantom_matrix: int = 512,
    log: Callable[[str], None] = print,
) -> Path:
    """Train ct-lung and write model.pt + manifest.yaml into out_dir; returns out_dir.

    Defaults are the shipped model's settings. `network`, `crop` and `phantom_matrix` exist for tests
    (a tiny network on small phantoms trains in seconds).
    """
    config = TrainConfig(
        seed=seed,
        iterations=iterations,
        phantoms=phantoms,
        phantom_matrix=phantom_matrix,
        real_cases=tuple(real_cases),
        network=dict(network) if network is not None else dict(NETWORK),
        crop=crop if crop is not None else TrainConfig.crop,
    )
    started = time.monotonic()
    cases = load_cases(config, log)
    log(f"data ready in {time.monotonic() - started:.0f} s")
    trained, history = train_network(cases, config, log)
    write_model(out_dir, trained, config)
    summary = {
        "config": {**asdict(config), "crop": list(config.crop), "real_cases": list(config.real_cases)},
        "history": history,
        "seconds": time.monotonic() - started,
    }
    (out_dir / "training-log.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log(f"wrote {out_dir} in {summary['seconds']:.0f} s")
    return out_dir
