"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed on a server).

- per-label strip charts of per-case Dice / HD95, and reference vs predicted volume;
- overlay montages: a few frames of each case with the reference contour (solid) and the model's
  contour (dashed) in the segment's colour;
- ROC curves and per-case probability strips for classifiers.
Figures are written with a fixed DPI and closed at once, so memory does not grow with the case count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no GUI backend on a headless node

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from dicom_ai_node.domain.results import SegmentSpec  # noqa: E402

_DPI = 100
_MONTAGE_FRAMES = 3


def strip_chart(
    values_by_label: Mapping[str, Sequence[float | None]], title: str, ylabel: str, path: Path
) -> Path:
    """One column of points per label (one point per case, jittered) with its median as a bar."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(values_by_label) + 2), 4.0))
    rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
    for x, values in enumerate(values_by_label.values()):
        finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
        if finite.size:
            ax.scatter(x + rng.uniform(-0.15, 0.15, finite.size), finite, s=18, alpha=0.7, zorder=3)
            ax.hlines(np.median(finite), x - 0.3, x + 0.3, colors="black", linewidth=2, zorder=4)
        undefined = len(values) - finite.size
        if undefined:
            ax.annotate(f"{undefined} undefined", (x, 0), ha="center", va="bottom", fontsize=8, color="red")
    ax.set_xticks(range(len(values_by_label)), list(values_by_label), rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def volume_scatter(pairs_by_label: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Predicted vs reference volume (cm3) per case, with the identity line."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    top = 0.0
    for label, pairs in pairs_by_label.items():
        if pairs:
            ref, pred = np.asarray(pairs, dtype=float).T
            ax.scatter(ref, pred, s=18, alpha=0.8, label=label)
            top = max(top, float(ref.max()), float(pred.max()))
    top = top * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="reference volume (cm3)", ylabel="model volume (cm3)")
    ax.set_title("Volumes per case")
    ax.legend(fontsize=8)
    return _save(fig, path)


def overlay_montage(
    image: npt.NDArray[np.floating[Any]],
    reference: Mapping[int, npt.NDArray[np.bool_]],
    prediction: npt.NDArray[np.integer[Any]],
    segments: Sequence[SegmentSpec],
    spacing: tuple[float, float, float],
    title: str,
    path: Path,
) -> Path:
    """A few frames of one case: reference contours solid (wide), model contours dashed, per segment colour.

    Frames: the one where reference and model disagree most, plus frames at 20% and 80% of the range
    holding any segment, so a reader sees both the worst slice and typical ones.
    """
    frames = _montage_frames(reference, prediction, segments)
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    fig, axes = plt.subplots(1, len(frames), figsize=(3.6 * len(frames), 3.9), squeeze=False)
    for ax, frame in zip(axes[0], frames, strict=True):
        ax.imshow(image[frame], cmap="gray", vmin=lo, vmax=hi, aspect=spacing[1] / spacing[2])
        for spec in segments:
            colour = tuple(c / 255 for c in spec.rgb)
            ref = reference.get(spec.label_value)
            # The reference wide and translucent under the model's thin dashed line: where they agree,
            # both stay visible.
            if ref is not None and ref[frame].any():
                ax.contour(
                    ref[frame].astype(np.float32), levels=[0.5], colors=[colour], linewidths=2.6, alpha=0.55
                )
            pred = prediction[frame] == spec.label_value
            if pred.any():
                ax.contour(
                    pred.astype(np.float32),
                    levels=[0.5],
                    colors=[colour],
                    linewidths=1.4,
                    linestyles="dashed",
                )
        ax.set_title(f"frame {frame + 1}/{image.shape[0]}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}  (solid: reference, dashed: model)", fontsize=10)
    return _save(fig, path)


def roc_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], float | None]], path: Path
) -> Path:
    """ROC curves, one per finding: label -> (fpr, tpr, auc)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(
            fpr, tpr, marker="o", markersize=3, label=f"{label} (AUC {auc:.3f})" if auc is not None else label
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def score_strips(scores: Mapping[str, tuple[Sequence[float], Sequence[int], float]], path: Path) -> Path:
    """Per finding: each case's probability, split by reference label, with the model's threshold."""
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores) + 0.8, 3.8), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (label, (probabilities, truth, threshold)) in zip(axes[0], scores.items(), strict=True):
        p, t = np.asarray(probabilities, dtype=float), np.asarray(truth, dtype=int)
        for x in (0, 1):
            chosen = p[t == x]
            ax.scatter(x + rng.uniform(-0.12, 0.12, chosen.size), chosen, s=18, alpha=0.75)
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1)
        ax.set_xticks([0, 1], ["reference 0", "reference 1"])
        ax.set(ylim=(-0.02, 1.02), xlim=(-0.5, 1.5), ylabel="probability", title=label)
    return _save(fig, path)


def _montage_frames(
    reference: Mapping[int, npt.NDArray[np.bool_]],
    prediction: npt.NDArray[np.integer[Any]],
    segments: Sequence[SegmentSpec],
) -> list[int]:
    n_frames = int(prediction.shape[0])
    disagreement = np.zeros(n_frames, dtype=np.int64)
    present = np.zeros(n_frames, dtype=bool)
    axes = (1, 2)
    for spec in segments:
        pred = prediction == spec.label_value
        ref = reference.get(spec.label_value)
        ref = np.zeros_like(pred) if ref is None else ref
        disagreement += np.count_nonzero(pred ^ ref, axis=axes)
        present |= pred.any(axis=axes) | ref.any(axis=axes)
    if not present.any():
        return [n_frames // 2]
    holding = np.flatnonzero(present)
    picks = {int(holding[int(q * (holding.size - 1))]) for q in (0.2, 0.8)}
    picks.add(int(np.argmax(disagreement)) if disagreement.any() else int(holding[holding.size // 2]))
    return sorted(picks)[:_MONTAGE_FRAMES]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path
