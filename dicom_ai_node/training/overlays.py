"""Overlay montages of a lung label map on its CT, to check reference masks and model output by eye.

Slices are shown in the radiological convention: the patient's right on the image's left, anterior at
the top (axial) and head at the top (coronal), whatever the acquisition's orientation, because the
volume is first reoriented to LPS axes from its affine. Right lung blue, left lung orange (the SEG
colours of the manifests); R and L mark the patient's sides.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dicom_ai_node.infer.volume import Volume

RIGHT_COLOUR = (80 / 255, 180 / 255, 250 / 255)
LEFT_COLOUR = (250 / 255, 200 / 255, 80 / 255)
_LUNG_WINDOW = (-1350.0, 150.0)


def _to_lps(volume: Volume, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU and labels on axes (x towards patient left, y posterior, z head) and the voxel size in mm."""
    ornt = nib.orientations.io_orientation(volume.affine_lps)
    hu = np.asarray(nib.orientations.apply_orientation(volume.array.transpose(2, 1, 0), ornt))
    lab = np.asarray(nib.orientations.apply_orientation(labels.transpose(2, 1, 0), ornt))
    spacing = np.linalg.norm(volume.affine_lps[:3, :3], axis=0)
    voxel = np.empty(3)
    for axis_in, (axis_out, _) in enumerate(ornt):
        voxel[int(axis_out)] = spacing[axis_in]
    return hu, lab, voxel


def _rgba(labels2d: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*labels2d.shape, 4), dtype=np.float32)
    for value, colour in ((1, RIGHT_COLOUR), (2, LEFT_COLOUR)):
        rgba[labels2d == value] = (*colour, alpha)
    return rgba


def render_montage(volume: Volume, labels: np.ndarray, path: Path, title: str, n_axial: int = 6) -> Path:
    """Write a PNG: `n_axial` axial slices evenly through the lungs and one coronal slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu, lab, voxel = _to_lps(volume, labels)
    z_with_lung = np.flatnonzero(lab.any(axis=(0, 1)))
    if len(z_with_lung) == 0:
        z_with_lung = np.arange(hu.shape[2])
    zs = np.linspace(z_with_lung[0], z_with_lung[-1], n_axial + 2)[1:-1].round().astype(int)
    y_coronal = (
        int(round(float(np.mean(np.flatnonzero(lab.any(axis=(0, 2))))))) if lab.any() else hu.shape[1] // 2
    )

    columns = (n_axial + 1) // 2 + 1
    fig = plt.figure(figsize=(4.2 * columns, 8.8), dpi=72)
    fig.suptitle(title, fontsize=13)
    grid = fig.add_gridspec(2, columns)
    panels = [
        (grid[k // ((n_axial + 1) // 2), k % ((n_axial + 1) // 2)], "axial", z) for k, z in enumerate(zs)
    ]
    panels.append((grid[:, columns - 1], "coronal", y_coronal))
    for cell, kind, index in panels:
        ax = fig.add_subplot(cell)
        if kind == "axial":
            # rows = y (anterior at the top), cols = x (patient right on the left: x grows to the left).
            image, labels2d, aspect = hu[:, :, index].T, lab[:, :, index].T, voxel[1] / voxel[0]
            ax.set_title(f"axial z={index}", fontsize=9)
        else:
            # rows = z reversed (head at the top), cols = x.
            image, labels2d, aspect = hu[:, index, ::-1].T, lab[:, index, ::-1].T, voxel[2] / voxel[0]
            ax.set_title(f"coronal y={index}", fontsize=9)
        ax.imshow(image, cmap="gray", vmin=_LUNG_WINDOW[0], vmax=_LUNG_WINDOW[1], aspect=aspect)
        ax.imshow(_rgba(labels2d, 0.3), aspect=aspect)
        for value, colour in ((1, RIGHT_COLOUR), (2, LEFT_COLOUR)):
            if (labels2d == value).any():
                ax.contour(labels2d == value, levels=[0.5], colors=[colour], linewidths=1.0)
        for x, text in ((0.03, "R"), (0.93, "L")):
            ax.text(x, 0.5, text, transform=ax.transAxes, color="yellow", fontsize=12, weight="bold")
        ax.set_axis_off()
    fig.text(
        0.01,
        0.01,
        "right lung: blue   left lung: orange   (radiological view: patient right on the left)",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
