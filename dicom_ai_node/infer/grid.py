"""Source grid <-> model grid: reorientation, resampling and intensity preparation, and the way back.

`to_model_grid` turns a Volume into the array a network sees (channels, x, y, z) as its manifest's
InputSpec asks; `labels_to_source_grid` turns the network's per-class probabilities on that grid into a
uint8 label map on the exact source grid (frames, rows, cols), so a SEG built from it lines up with the
source slices one to one. Training (dicom_ai_node.training) prepares its data with the same function,
so a model sees the same grid in training and in the node.

Reorientation is an axis permutation plus flips (nibabel orientations), so it is exact both ways.
Resampling is separable linear interpolation (torch, align_corners=False), done in slabs so memory
stays bounded for long series: at most one slab of the source grid at float32 per class is alive at
once besides the input volume itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.manifest import InputSpec
from dicom_ai_node.infer.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices per slab when resampling in-plane: 32 slices of 512x512 float32 are 32 MB per channel.
_SLAB = 32
# Slices per slab when upsampling probabilities to the source grid: per slab, the upsampled classes
# (3 x 8 MB for 8 slices of 512x512, twice while torch hands them over) and their argmax (int64, 16 MB)
# are alive at once; 8 rather than 16 took 116 MB off the inference process's peak for a 600-slice CT.
_LABEL_SLAB = 8


@dataclass(frozen=True)
class GridMap:
    """How the model grid relates to the source grid, to undo `to_model_grid` exactly."""

    # nibabel orientation transform from the NIfTI view (cols, rows, frames) to the model axes.
    transform: np.ndarray
    # Shape after reorientation, before resampling, and the model grid's shape.
    oriented_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    # Voxel size (mm) along each model axis, on the oriented grid and on the model grid.
    oriented_spacing: tuple[float, float, float]
    model_spacing: tuple[float, float, float]


def to_model_grid(volume: Volume, spec: InputSpec) -> tuple[np.ndarray, GridMap]:
    """The volume as float32 (channels, x, y, z) on the model grid, intensity-prepared, and its GridMap."""
    data = volume.array.transpose(2, 1, 0)  # (cols, rows, frames): the NIfTI view, no copy
    affine_ras = _LPS_TO_RAS @ volume.affine_lps
    source_spacing = tuple(float(v) for v in np.linalg.norm(affine_ras[:3, :3], axis=0))
    if spec.orientation == "native":
        transform = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    else:
        current = nib.orientations.io_orientation(affine_ras)
        transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(spec.orientation))
    oriented = nib.orientations.apply_orientation(data, transform)
    oriented_spacing = [0.0, 0.0, 0.0]
    for axis_in, (axis_out, _) in enumerate(transform):
        oriented_spacing[int(axis_out)] = source_spacing[axis_in]
    oriented_shape = tuple(int(n) for n in oriented.shape)

    if spec.size is not None and len(spec.size) == 3:
        model_shape = tuple(int(n) for n in spec.size)
    elif spec.spacing_mm is not None:
        model_shape = tuple(
            max(1, round(n * s / t))
            for n, s, t in zip(oriented_shape, oriented_spacing, spec.spacing_mm, strict=True)
        )
    else:
        model_shape = oriented_shape
    model_spacing = tuple(
        s * n / m for s, n, m in zip(oriented_spacing, oriented_shape, model_shape, strict=True)
    )
    # The reoriented view goes in as it is: resize copies it slab by slab, so the whole source volume
    # (629 MB for 600 slices of 512 x 512) is not duplicated next to the read-only input.
    resampled = resize(oriented[None], model_shape)[0]
    prepared = prepare_intensity(resampled, spec)
    grid = GridMap(
        transform=transform,
        oriented_shape=oriented_shape,  # type: ignore[arg-type]
        model_shape=model_shape,  # type: ignore[arg-type]
        oriented_spacing=tuple(oriented_spacing),  # type: ignore[arg-type]
        model_spacing=model_spacing,  # type: ignore[arg-type]
    )
    return np.repeat(prepared[None], spec.channels, axis=0), grid


def frame_image(volume: Volume, spec: InputSpec) -> np.ndarray:
    """A 2-D classifier's input: the middle frame as (channels, rows, cols), resized to spec.size."""
    if spec.size is None or len(spec.size) != 2:
        raise InferenceError("a 2-D input needs input.size: [rows, cols]")
    frame = volume.array[volume.shape[0] // 2]
    tensor = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=spec.size, mode="bilinear", align_corners=False, antialias=True)
    prepared = prepare_intensity(resized[0, 0].numpy(), spec)
    return np.repeat(prepared[None], spec.channels, axis=0)


def prepare_intensity(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Clip to the window and normalise, as the manifest's input.intensity says (float32 out)."""
    intensity = spec.intensity
    out = array.astype(np.float32, copy=True)
    if intensity.window is not None:
        lo, hi = intensity.window
    else:
        lo, hi = (float(v) for v in np.percentile(out, [0.5, 99.5]))
    if intensity.normalise == "none":
        if intensity.window is not None:
            np.clip(out, lo, hi, out=out)
        return out
    np.clip(out, lo, hi, out=out)
    if intensity.normalise == "minmax":
        out -= np.float32(lo)
        out /= np.float32(max(hi - lo, 1e-6))
    else:
        out -= np.float32(out.mean())
        out /= np.float32(max(float(out.std()), 1e-6))
    return out


def resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear resize of (channels, x, y, z) to (channels, *shape), slab by slab along z.

    In-plane first (bilinear, antialiased when shrinking), then along z (linear): trilinear weights are
    the product of per-axis weights, so the two passes equal one trilinear pass.
    """
    channels, nx, ny, nz = array.shape
    tx, ty, tz = (int(n) for n in shape)
    if (nx, ny, nz) == (tx, ty, tz):
        return array.astype(np.float32, copy=False)
    shrinking = tx < nx or ty < ny
    inplane = np.empty((channels, tx, ty, nz), dtype=np.float32)
    for z0 in range(0, nz, _SLAB):
        slab = torch.from_numpy(np.ascontiguousarray(array[:, :, :, z0 : z0 + _SLAB], dtype=np.float32))
        # (C, X, Y, S) -> (S, C, X, Y): slices as the batch
        batch = slab.permute(3, 0, 1, 2)
        if (nx, ny) != (tx, ty):
            batch = F.interpolate(
                batch, size=(tx, ty), mode="bilinear", align_corners=False, antialias=shrinking
            )
        inplane[:, :, :, z0 : z0 + _SLAB] = batch.permute(1, 2, 3, 0).numpy()
    if nz == tz:
        return inplane
    out = np.empty((channels, tx, ty, tz), dtype=np.float32)
    for x0 in range(0, tx, _SLAB):
        rows = torch.from_numpy(np.ascontiguousarray(inplane[:, x0 : x0 + _SLAB]))
        c, sx, sy, _ = rows.shape
        line = rows.reshape(c * sx * sy, 1, nz)
        line = F.interpolate(line, size=tz, mode="linear", align_corners=False)
        out[:, x0 : x0 + _SLAB] = line.reshape(c, sx, sy, tz).numpy()
    return out


def labels_to_source_grid(probabilities: np.ndarray, grid: GridMap, label_values: list[int]) -> np.ndarray:
    """Per-class probabilities (C, *model_shape) -> uint8 label map (frames, rows, cols) on the source grid.

    Channel 0 is background; channel k >= 1 is `label_values[k - 1]`. Probabilities are resampled
    (linear) before the argmax, so edges are as smooth as the source grid allows rather than blocky.
    """
    channels = probabilities.shape[0]
    if channels != len(label_values) + 1:
        raise InferenceError(f"model output has {channels} channels, expected {len(label_values) + 1}")
    if tuple(probabilities.shape[1:]) != grid.model_shape:
        raise InferenceError(
            f"model output shape {probabilities.shape[1:]} is not the input grid {grid.model_shape}"
        )
    lut = np.array([0, *label_values], dtype=np.uint8)
    tx, ty, tz = grid.oriented_shape
    # The label map on the source grid, written through its reoriented view (flips and a transpose: no
    # copy), so no second full-size array is made to reorient it back.
    source_shape = [0, 0, 0]  # (cols, rows, frames): the NIfTI view of the source grid
    for axis_in, (axis_out, _) in enumerate(grid.transform):
        source_shape[axis_in] = grid.oriented_shape[int(axis_out)]
    cols, rows, frames = source_shape
    labels = np.empty((frames, rows, cols), dtype=np.uint8)
    oriented = nib.orientations.apply_orientation(labels.transpose(2, 1, 0), grid.transform)
    # z first (cheap on the small model grid), then in-plane per slab straight into labels.
    along_z = resize(probabilities.astype(np.float32, copy=False), (*grid.model_shape[:2], tz))
    for z0 in range(0, tz, _LABEL_SLAB):
        slab = along_z[:, :, :, z0 : z0 + _LABEL_SLAB]
        up = resize(slab, (tx, ty, slab.shape[3]))
        oriented[:, :, z0 : z0 + _LABEL_SLAB] = lut[np.argmax(up, axis=0)]
    return labels


def label_map_to_model_grid(label_map: np.ndarray, grid: GridMap) -> np.ndarray:
    """A reference label map on the source grid (frames, rows, cols) -> the model grid, nearest label.

    Used by training to put reference masks on the grid `to_model_grid` made for the image.
    """
    oriented = nib.orientations.apply_orientation(label_map.transpose(2, 1, 0), grid.transform)
    tensor = torch.from_numpy(np.ascontiguousarray(oriented, dtype=np.uint8))[None, None].float()
    resized = F.interpolate(tensor, size=grid.model_shape, mode="nearest-exact")
    return resized[0, 0].numpy().astype(np.uint8)
