"""Validation metrics: overlap and surface distance for masks, confusion-matrix rates and ROC for scores.

Pure numpy/scipy (no scikit-learn, no torch), so the numbers can be checked by hand.

Segmentation, per label and case, on boolean masks on the same grid with spacing (dz, dy, dx) in mm:
- Dice = 2|P & R| / (|P| + |R|). Both empty: 1.0 (the model correctly found nothing); one empty: 0.0.
- HD95 (mm): the 95th percentile Hausdorff distance between the two mask surfaces, as MONAI's
  `compute_hausdorff_distance(percentile=95)` defines it: surface voxels are the mask minus its
  6-connected erosion, distances are Euclidean between voxel centres with the true (anisotropic)
  spacing, and HD95 = max(P95 of P->R surface distances, P95 of R->P). Both empty: 0.0; one empty:
  +inf (undefined: there is no surface to measure to). JSON writes inf as null.
- Volume error: predicted minus reference, in cm3 and in % of the reference (undefined, None, when the
  reference is empty).

Classification, per finding, from 0/1 truths and probabilities:
- accuracy, precision (PPV), recall (sensitivity), specificity at the model's threshold; a rate whose
  denominator is 0 is None (undefined), never 0 or 1, so it cannot flatter a model;
- ROC curve (one point per distinct score) and AUC by the Mann-Whitney U statistic with average ranks
  for ties, so a tie between a positive and a negative case counts one half;
- 95% intervals: Wilson score for proportions, Hanley & McNeil (1982) for the AUC (approximate; small
  test sets give wide intervals, which is the point of showing them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from scipy.stats import rankdata

BoolArray = npt.NDArray[np.bool_]
Spacing = tuple[float, float, float]

_Z95 = 1.959963984540054  # two-sided 95% normal quantile
_MM3_PER_CM3 = 1000.0


def dice(prediction: BoolArray, reference: BoolArray) -> float:
    """Sørensen-Dice coefficient; 1.0 when both masks are empty, 0.0 when exactly one is."""
    _check_same_shape(prediction, reference)
    p_sum, r_sum = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    if p_sum + r_sum == 0:
        return 1.0
    overlap = int(np.count_nonzero(np.logical_and(prediction, reference)))
    return 2.0 * overlap / (p_sum + r_sum)


def hd95(prediction: BoolArray, reference: BoolArray, spacing: Spacing) -> float:
    """95th percentile symmetric Hausdorff distance in mm; 0.0 if both empty, +inf if exactly one is."""
    _check_same_shape(prediction, reference)
    if prediction.ndim != len(spacing):
        raise ValueError(f"spacing {spacing} does not match a {prediction.ndim}-D mask")
    p_any, r_any = bool(prediction.any()), bool(reference.any())
    if not p_any and not r_any:
        return 0.0
    if not p_any or not r_any:
        return math.inf
    # Crop to the union's bounding box plus one voxel: distances between surfaces inside it are
    # unchanged, and the margin keeps a mask that does not touch the volume border from looking like
    # it does (which would add false surface voxels at the crop edge).
    box = _bounding_box(np.logical_or(prediction, reference), margin=1)
    p_crop, r_crop = prediction[box], reference[box]
    p_surface, r_surface = _surface(p_crop), _surface(r_crop)
    p_to_r = _distances_to(r_surface, spacing)[p_surface]
    r_to_p = _distances_to(p_surface, spacing)[r_surface]
    return float(max(np.percentile(p_to_r, 95), np.percentile(r_to_p, 95)))


@dataclass(frozen=True)
class VolumeError:
    reference_cm3: float
    prediction_cm3: float
    error_cm3: float  # prediction - reference: positive = over-segmentation
    error_pct: float | None  # None when the reference is empty


def volume_error(prediction: BoolArray, reference: BoolArray, voxel_mm3: float) -> VolumeError:
    reference_cm3 = int(np.count_nonzero(reference)) * voxel_mm3 / _MM3_PER_CM3
    prediction_cm3 = int(np.count_nonzero(prediction)) * voxel_mm3 / _MM3_PER_CM3
    error = prediction_cm3 - reference_cm3
    pct = 100.0 * error / reference_cm3 if reference_cm3 > 0 else None
    return VolumeError(reference_cm3, prediction_cm3, error, pct)


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def confusion(truth: Sequence[int], predicted: Sequence[bool]) -> Confusion:
    """Counts of true/false positives/negatives; `truth` holds 0/1, `predicted` the thresholded calls."""
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted differ in length")
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    return Confusion(
        tp=int(np.sum(t & p)), fp=int(np.sum(~t & p)), tn=int(np.sum(~t & ~p)), fn=int(np.sum(t & ~p))
    )


@dataclass(frozen=True)
class RocCurve:
    """Points from (0, 0) to (1, 1); `thresholds[i]` is the score at or above which a case is called
    positive to reach point i (thresholds[0] = +inf: nothing called positive)."""

    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]


def roc_curve(truth: Sequence[int], scores: Sequence[float]) -> RocCurve | None:
    """The empirical ROC curve; None when the cases are all positive or all negative."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order]
    # One point per distinct score: tied cases move the curve together (a diagonal step), which is
    # what makes the trapezoidal area equal the Mann-Whitney AUC with ties counted one half.
    last_of_run = np.r_[np.diff(s_sorted) != 0, True]
    tps = np.cumsum(t_sorted)[last_of_run]
    fps = np.cumsum(~t_sorted)[last_of_run]
    return RocCurve(
        fpr=[0.0, *(fps / n_neg).tolist()],
        tpr=[0.0, *(tps / n_pos).tolist()],
        thresholds=[math.inf, *s_sorted[last_of_run].tolist()],
    )


def roc_auc(truth: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve = P(score of a random positive > a random negative) + 0.5 P(tie).

    Computed as the Mann-Whitney U statistic from average ranks; None without both classes.
    """
    t = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64), method="average")
    u = float(ranks[t].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auc_interval(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """Approximate 95% interval of an AUC (Hanley & McNeil 1982, Radiology 143:29), clipped to [0, 1]."""
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    half = _Z95 * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def wilson_interval(successes: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (well behaved at 0/n and n/n, unlike the Wald one)."""
    if n == 0:
        return None
    p = successes / n
    z2 = _Z95 * _Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """n, mean, median, min, max and std (population) of the finite values; `n_undefined` counts the
    None/inf/nan ones (e.g. HD95 with an empty mask), which are left out of the statistics."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    stats: dict[str, float | int | None] = {"n": len(finite), "n_undefined": len(values) - len(finite)}
    if not finite:
        return {**stats, "mean": None, "median": None, "min": None, "max": None, "std": None}
    array = np.asarray(finite)
    return {
        **stats,
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
        "std": float(array.std()),
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")


def _bounding_box(mask: BoolArray, margin: int) -> tuple[slice, ...]:
    box: list[slice] = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(
            slice(max(0, int(present[0]) - margin), min(mask.shape[axis], int(present[-1]) + margin + 1))
        )
    return tuple(box)


def _surface(mask: BoolArray) -> BoolArray:
    """Voxels of the mask with a 6-connected (face) neighbour outside it or on the volume border."""
    eroded = ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(mask.ndim, 1), border_value=0)
    surface: BoolArray = np.logical_and(mask, np.logical_not(eroded))
    return surface


def _distances_to(surface: BoolArray, spacing: Spacing) -> npt.NDArray[np.float64]:
    """Distance (mm) from every voxel centre to the nearest voxel of `surface`."""
    distances: npt.NDArray[np.float64] = ndi.distance_transform_edt(np.logical_not(surface), sampling=spacing)
    return distances
