"""Model registry and the classical lung model on a real chest CT (deepbet on ch2 runs in the e2e test)."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from dicom_ai_node.errors import ModelNotFoundError
from dicom_ai_node.infer.registry import ModelRegistry, default_registry, select_device
from dicom_ai_node.infer.volume import Volume, load_series, voxel_volume_mm3
from tests.support.datasets import lung_ct_series


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


def test_builtin_models_are_registered() -> None:
    assert set(default_registry("cpu").names()) == {"mr-brain", "ct-lung-classical"}


@pytest.fixture(scope="module")
def lung2(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_series(list(lung_ct_series(tmp_path_factory.mktemp("lung2"), "lung2").paths))


def _centroid_x(volume: Volume, mask: np.ndarray) -> float:
    k, j, i = np.nonzero(mask)
    return float((volume.affine_lps @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[0])


def _check_lungs(volume: Volume, label_map: np.ndarray) -> dict[str, float]:
    model = default_registry("cpu").get("ct-lung-classical")
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


def test_classical_lungs_on_real_chest_ct(lung2: Volume) -> None:
    model = default_registry("cpu").get("ct-lung-classical")
    volumes = _check_lungs(lung2, model.segment(lung2))
    print("lung2 volumes (L):", volumes)
    # The pyradiomics CTs cover part of the chest (61 x 5 mm): plausible, not whole-lung, volumes.
    assert all(0.4 < v < 4.0 for v in volumes.values()), volumes


def test_left_right_follow_patient_coordinates_not_array_order(lung2: Volume) -> None:
    """The same CT with its columns stored mirrored (IOP row cosine -1): labels must follow the patient."""
    model = default_registry("cpu").get("ct-lung-classical")
    cols = lung2.shape[2]
    flipped_affine = lung2.affine_lps.copy()
    flipped_affine[:3, 3] = (lung2.affine_lps @ np.array([cols - 1, 0, 0, 1]))[:3]
    flipped_affine[:3, 0] = -lung2.affine_lps[:3, 0]
    mirrored = replace(lung2, array=np.ascontiguousarray(lung2.array[:, :, ::-1]), affine_lps=flipped_affine)
    original = model.segment(lung2)
    labels = model.segment(mirrored)
    _check_lungs(mirrored, labels)
    np.testing.assert_array_equal(labels[:, :, ::-1], original)
