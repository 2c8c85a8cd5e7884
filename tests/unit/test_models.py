"""Model registry, deepbet on the real ch2 T1 MR and the classical lung model on real chest CTs.

deepbet: ~1.5 s to load plus ~2.5 s per call on CPU; the lung model ~2 s per CT.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai_node.devtools.datasets import lung_ct_series
from dicom_ai_node.errors import InferenceError, ModelNotFoundError
from dicom_ai_node.infer.base import SegmentationModel
from dicom_ai_node.infer.manifest import verify_weights
from dicom_ai_node.infer.registry import ModelRegistry, default_registry, select_device
from dicom_ai_node.infer.volume import Volume, load_series, voxel_volume_mm3
from tests.support.tools import require


def test_unknown_model_is_a_permanent_error() -> None:
    with pytest.raises(ModelNotFoundError, match="no model named 'nope'"):
        default_registry("cpu").get("nope")


def test_models_load_once_and_stay_warm() -> None:
    calls: list[int] = []

    class Dummy:
        def __init__(self) -> None:
            calls.append(1)

    registry = ModelRegistry()
    registry.register("dummy", Dummy)  # type: ignore[arg-type]
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(registry.get("dummy"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(g is got[0] for g in got)
    assert registry.is_loaded("dummy")


def test_device_falls_back_to_cpu_without_cuda() -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto") == expected
    assert select_device("cpu") == "cpu"


def test_builtin_models_are_registered_from_their_manifests() -> None:
    registry = default_registry("cpu")
    assert {"mr-brain", "ct-lung", "ct-lung-classical"} <= set(registry.names())
    for name in registry.names():
        manifest = registry.manifest(name)
        assert manifest.name == name and manifest.licence and manifest.intended_use and manifest.training_data
        assert verify_weights(manifest) == []


def test_registering_again_replaces_the_model() -> None:
    registry = ModelRegistry()
    registry.register("b", object)  # type: ignore[arg-type]
    first = registry.get("b")
    registry.register("b", object)  # type: ignore[arg-type]
    assert registry.get("b") is not first
    registry.register("a", object)  # type: ignore[arg-type]
    assert registry.names() == ["a", "b"]


CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


def _volume_from_nifti(path: Path, modality: str) -> Volume:
    """A Volume straight from a NIfTI file (RAS -> LPS), with minimal fabricated headers."""
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    headers = []
    series_uid = generate_uid()
    for _ in range(data.shape[2]):
        ds = Dataset()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        headers.append(ds)
    dx, dy, dz = (float(v) for v in np.linalg.norm(affine_lps[:3, :3], axis=0))
    return Volume(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        datasets=headers,
        paths=[],
        spacing=(dz, dy, dx),
        affine_lps=affine_lps,
        modality=modality,
    )


def segmenter(name: str) -> SegmentationModel:
    """A built-in segmentation model (the registry's get() also returns classifiers)."""
    model = default_registry("cpu").get(name)
    assert isinstance(model, SegmentationModel), name
    return model


@pytest.fixture(scope="module")
def brain_model() -> SegmentationModel:
    return segmenter("mr-brain")


@pytest.fixture(scope="module")
def ch2() -> tuple[Volume, np.ndarray]:
    require(CH2.is_file() and CH2BET.is_file(), "ch2 templates", "apt-get install mricron-data")
    volume = _volume_from_nifti(CH2, "MR")
    reference_image = nib.load(CH2BET)
    assert isinstance(reference_image, nib.Nifti1Image)
    reference = np.asarray(reference_image.dataobj).transpose(2, 1, 0) > 0
    return volume, reference


@pytest.fixture(scope="module")
def ch2_labels(brain_model: SegmentationModel, ch2: tuple[Volume, np.ndarray]) -> np.ndarray:
    start = time.perf_counter()
    labels = brain_model.segment(ch2[0])
    print(f"deepbet on ch2: {time.perf_counter() - start:.1f} s")
    return labels


def test_deepbet_brain_mask_on_real_t1_mr(
    brain_model: SegmentationModel, ch2: tuple[Volume, np.ndarray], ch2_labels: np.ndarray
) -> None:
    volume, reference = ch2
    labels = ch2_labels
    assert brain_model.identity.name == "mr-brain" and brain_model.identity.version == "1.0.2"
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    brain = labels == 1
    dice = 2 * np.logical_and(brain, reference).sum() / (brain.sum() + reference.sum())
    print(f"deepbet Dice vs ch2bet: {dice:.4f}")
    assert dice >= 0.93


def test_deepbet_mask_follows_the_source_grid_when_frames_are_reversed(
    brain_model: SegmentationModel, ch2: tuple[Volume, np.ndarray], ch2_labels: np.ndarray
) -> None:
    """Frames stored feet-first (reversed, affine adjusted): the mask must come back on that grid."""
    volume, _ = ch2
    frames = volume.shape[0]
    reverse = np.eye(4)
    reverse[2, 2], reverse[2, 3] = -1.0, frames - 1
    reversed_volume = replace(
        volume,
        array=np.ascontiguousarray(volume.array[::-1]),
        datasets=volume.datasets[::-1],
        affine_lps=volume.affine_lps @ reverse,
    )
    np.testing.assert_array_equal(brain_model.segment(reversed_volume)[::-1], ch2_labels)


def test_lung_model_refuses_a_ct_without_lungs() -> None:
    water = np.zeros((8, 64, 64), dtype=np.float32)  # 0 HU everywhere: a body, no air
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3"
    volume = Volume(water, [ds] * 8, [], (2.0, 1.0, 1.0), np.diag([1.0, 1.0, 2.0, 1.0]), "CT")
    with pytest.raises(InferenceError, match="no lung found"):
        segmenter("ct-lung-classical").segment(volume)


@pytest.fixture(scope="module")
def lung1(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_series(list(lung_ct_series(tmp_path_factory.mktemp("lung1"), "lung1").paths))


@pytest.fixture(scope="module")
def lung2(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_series(list(lung_ct_series(tmp_path_factory.mktemp("lung2"), "lung2").paths))


def _centroid_x(volume: Volume, mask: np.ndarray) -> float:
    k, j, i = np.nonzero(mask)
    return float((volume.affine_lps @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[0])


def _check_lungs(volume: Volume, label_map: np.ndarray) -> dict[str, float]:
    model = segmenter("ct-lung-classical")
    by_name = {s.label: s.label_value for s in model.segments}
    assert label_map.shape == volume.shape and label_map.dtype == np.uint8
    volumes = {}
    for name, value in by_name.items():
        mask = label_map == value
        volumes[name] = mask.sum() * voxel_volume_mm3(volume) / 1e6  # litres
        # Never touches the in-plane border (outside air was removed).
        assert not (
            mask[:, 0, :].any() or mask[:, -1, :].any() or mask[:, :, 0].any() or mask[:, :, -1].any()
        )
    # Patient left is +x in LPS.
    assert _centroid_x(volume, label_map == by_name["Left lung"]) > _centroid_x(
        volume, label_map == by_name["Right lung"]
    )
    return volumes


@pytest.mark.parametrize("which", ["lung1", "lung2"])
def test_classical_lungs_on_real_chest_ct(which: str, request: pytest.FixtureRequest) -> None:
    """lung1: both lungs joined by the bronchi (split at the midline); lung2: two separate components."""
    volume: Volume = request.getfixturevalue(which)
    model = segmenter("ct-lung-classical")
    start = time.perf_counter()
    label_map = model.segment(volume)
    elapsed = time.perf_counter() - start
    volumes = _check_lungs(volume, label_map)
    print(f"{which} volumes (L): {volumes} in {elapsed:.1f} s")
    # Mostly air-like lung parenchyma: the threshold region, plus filled vessels.
    assert np.median(volume.array[label_map > 0]) < -700
    # The pyradiomics CTs cover part of the chest (61 x 5 mm): plausible, not whole-lung, volumes.
    assert all(0.4 < v < 4.0 for v in volumes.values()), volumes


def test_left_right_follow_patient_coordinates_not_array_order(lung2: Volume) -> None:
    """The same CT with its columns stored mirrored (IOP row cosine -1): labels must follow the patient."""
    model = segmenter("ct-lung-classical")
    cols = lung2.shape[2]
    flipped_affine = lung2.affine_lps.copy()
    flipped_affine[:3, 3] = (lung2.affine_lps @ np.array([cols - 1, 0, 0, 1]))[:3]
    flipped_affine[:3, 0] = -lung2.affine_lps[:3, 0]
    mirrored = replace(lung2, array=np.ascontiguousarray(lung2.array[:, :, ::-1]), affine_lps=flipped_affine)
    original = model.segment(lung2)
    labels = model.segment(mirrored)
    _check_lungs(mirrored, labels)
    np.testing.assert_array_equal(labels[:, :, ::-1], original)
