"""Validation metrics against values computed by hand (and HD95 against MONAI's implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_ai_node.evaluate.metrics import (
    auc_interval,
    confusion,
    dice,
    hd95,
    roc_auc,
    roc_curve,
    summarise,
    volume_error,
    wilson_interval,
)


def _mask(shape: tuple[int, int, int], *voxels: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


def test_dice_by_hand() -> None:
    pred = np.zeros((1, 1, 10), dtype=bool)
    ref = np.zeros_like(pred)
    pred[..., 0:4] = True  # 4 voxels
    ref[..., 1:7] = True  # 6 voxels, 3 shared
    assert dice(pred, ref) == pytest.approx(2 * 3 / (4 + 6))
    assert dice(pred, pred) == 1.0


def test_dice_of_empty_masks() -> None:
    empty = np.zeros((2, 3, 4), dtype=bool)
    one = _mask((2, 3, 4), (1, 1, 1))
    assert dice(empty, empty) == 1.0  # the model rightly found nothing
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(empty, np.zeros((2, 3, 5), dtype=bool))


def test_hd95_uses_the_anisotropic_spacing_in_frame_row_column_order() -> None:
    # One voxel each: 1 frame and 2 rows apart; spacing (dz, dy, dx) = (3, 0.5, 0.5) mm.
    a = _mask((3, 5, 5), (0, 0, 0))
    b = _mask((3, 5, 5), (1, 2, 0))
    assert hd95(a, b, (3.0, 0.5, 0.5)) == pytest.approx(math.sqrt(3.0**2 + 1.0**2))
    assert hd95(a, b, (0.5, 0.5, 3.0)) == pytest.approx(math.sqrt(0.5**2 + 1.0**2))


def test_hd95_of_a_slab_missing_one_slice() -> None:
    # A 1-voxel-thick plate vs the same plate plus one more slice on top: every surface voxel of the
    # extra slice is exactly one slice step (2.5 mm) from the reference, everything else is 0. The extra
    # slice is half of the prediction's surface, so the 95th percentile is 2.5 mm.
    ref = np.zeros((4, 6, 6), dtype=bool)
    ref[1, 1:5, 1:5] = True
    pred = ref.copy()
    pred[2, 1:5, 1:5] = True
    assert hd95(pred, ref, (2.5, 0.7, 0.7)) == pytest.approx(2.5)
    assert hd95(ref, pred, (2.5, 0.7, 0.7)) == pytest.approx(2.5)  # symmetric


def test_hd95_of_empty_masks() -> None:
    empty = np.zeros((3, 3, 3), dtype=bool)
    one = _mask((3, 3, 3), (1, 1, 1))
    assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(one, empty, (1.0, 1.0, 1.0)) == math.inf
    assert hd95(empty, one, (1.0, 1.0, 1.0)) == math.inf


def test_hd95_does_not_depend_on_padding_around_the_masks() -> None:
    # Cropping to the masks' bounding box must treat the volume border as the border, no more.
    rng = np.random.default_rng(3)
    a = rng.random((6, 7, 8)) > 0.5
    b = rng.random((6, 7, 8)) > 0.5
    padded_a, padded_b = (np.pad(m, 4) for m in (a, b))
    spacing = (2.0, 0.8, 1.1)
    assert hd95(padded_a, padded_b, spacing) == pytest.approx(hd95(a, b, spacing))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_matches_monai() -> None:
    import monai.metrics as monai_metrics  # required dependencies: an ImportError fails, never skips
    import torch
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    spacing = (3.0, 0.7, 1.1)
    for _ in range(3):
        a = ndi.binary_opening(rng.random((16, 24, 20)) > 0.55)
        b = ndi.binary_opening(rng.random((16, 24, 20)) > 0.55)
        expected = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(a)[None, None].float(),
            torch.from_numpy(b)[None, None].float(),
            include_background=True,
            percentile=95,
            spacing=spacing,
        )
        assert hd95(a, b, spacing) == pytest.approx(float(expected), rel=1e-5)


def test_volume_error() -> None:
    pred = np.zeros(20, dtype=bool)
    ref = np.zeros(20, dtype=bool)
    pred[:10] = True
    ref[:8] = True
    error = volume_error(pred, ref, voxel_mm3=2.5)
    assert (error.reference_cm3, error.prediction_cm3) == pytest.approx((0.020, 0.025))
    assert error.error_cm3 == pytest.approx(0.005) and error.error_pct == pytest.approx(25.0)
    assert volume_error(pred, np.zeros_like(ref), 2.5).error_pct is None


def test_confusion_rates_and_undefined_denominators() -> None:
    counts = confusion([1, 1, 0, 0, 0], [True, False, True, False, False])
    assert (counts.tp, counts.fn, counts.fp, counts.tn) == (1, 1, 1, 2)
    assert counts.accuracy == pytest.approx(3 / 5)
    assert counts.precision == 0.5 and counts.recall == 0.5 and counts.specificity == pytest.approx(2 / 3)
    never_positive = confusion([1, 0], [False, False])
    assert never_positive.precision is None and never_positive.recall == 0.0 and never_positive.f1 == 0.0
    no_positives = confusion([0, 0], [True, False])
    assert no_positives.recall is None and no_positives.specificity == 0.5
    no_negatives = confusion([1, 1], [True, True])
    assert no_negatives.specificity is None and no_negatives.precision == 1.0
    assert confusion([], []).accuracy is None


def test_auc_with_ties_counts_half() -> None:
    truth = [0, 0, 1, 1, 0]
    scores = [0.02, 0.27, 0.27, 0.73, 0.98]
    # Positive pairs won: 0.27 beats 0.02, ties 0.27 (1/2), loses to 0.98; 0.73 beats two: 3.5 of 6.
    assert roc_auc(truth, scores) == pytest.approx(3.5 / 6)
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert roc_auc([0, 0, 1], [0.9, 0.8, 0.1]) == 0.0
    assert roc_auc([1, 1], [0.2, 0.3]) is None and roc_auc([], []) is None


def test_roc_curve_points_and_area() -> None:
    curve = roc_curve([0, 0, 1, 1, 0], [0.02, 0.27, 0.27, 0.73, 0.98])
    assert curve is not None
    assert curve.thresholds == [math.inf, 0.98, 0.73, 0.27, 0.02]
    assert curve.fpr == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert curve.tpr == pytest.approx([0, 0, 0.5, 1, 1])
    assert roc_curve([1, 1], [0.1, 0.2]) is None
    # With ties (integer scores), the trapezoidal area under the curve is the Mann-Whitney AUC.
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 200).tolist()
    scores = rng.integers(0, 5, 200).astype(float).tolist()
    curve = roc_curve(truth, scores)
    assert curve is not None
    area = sum(
        (x1 - x0) * (y0 + y1) / 2
        for x0, x1, y0, y1 in zip(curve.fpr[:-1], curve.fpr[1:], curve.tpr[:-1], curve.tpr[1:], strict=True)
    )
    assert area == pytest.approx(roc_auc(truth, scores))


def test_intervals() -> None:
    lo, hi = wilson_interval(0, 10)  # type: ignore[misc]
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # the textbook Wilson upper bound for 0/10
    lo, hi = wilson_interval(5, 10)  # type: ignore[misc]
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) is None
    narrow, wide = auc_interval(0.8, 100, 100), auc_interval(0.8, 10, 10)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1] <= 1.0


def test_summarise_leaves_out_undefined_values() -> None:
    stats = summarise([1.0, None, math.inf, 3.0])
    assert stats == {"n": 2, "n_undefined": 2, "mean": 2.0, "median": 2.0, "min": 1.0, "max": 3.0, "std": 1.0}
    assert summarise([None])["mean"] is None
