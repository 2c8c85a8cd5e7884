"""`ct-lung-classical`: right and left lung on chest CT by classical image processing (not a CNN).

No CT segmentation weights ship in any installable package (docs/models.md), so
this built-in model is honest thresholding plus connected components, good enough for a lung volume
report and for exercising the SEG/SR path end to end:

1. Reorient (axis permutation/flip only, so exactly invertible) to canonical axes: array axis 0 points
   to the patient's left, 1 posterior, 2 superior (the LPS directions, read from the affine).
2. Body = largest connected component above -500 HU, holes filled per axial slice.
3. Air candidates = below -320 HU inside the body; components touching the in-plane border are outside
   air and dropped.
4. The trachea is tracked from the top slice down while it is a small midline component, and removed
   (main bronchi stay: they merge with the lungs at 5 mm slices).
5. Connected components; when both lungs form one component (joined by bronchi or the anterior junction
   line) it is cut at the plane of fewest voxels between the two lungs.
6. Per lung: largest component, light closing, holes (vessels) filled per slice.
7. Label 1 = right lung, 2 = left lung, decided by mean LPS x (patient left is +x), so flipped or
   mirrored acquisitions are labelled correctly.
"""

from __future__ import annotations

from typing import Literal

import cc3d
import fill_voids
import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from dicom_ai_node.domain.results import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_LEFT_LUNG,
    SCT_RIGHT_LUNG,
    ModelIdentity,
    SegmentSpec,
)
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.manifest import ModelManifest
from dicom_ai_node.infer.volume import Volume

MODEL_NAME = "ct-lung-classical"
MODEL_VERSION = "1.0.0"
RIGHT_LUNG_LABEL = 1
LEFT_LUNG_LABEL = 2

_BODY_HU = -500.0
_AIR_HU = -320.0
_MIN_LUNG_ML = 50.0
# A lung found as a separate component must be at least this fraction of the larger one (a stomach gas
# bubble or bowel loop is much smaller than a lung).
_MIN_SECOND_LUNG_FRACTION = 0.2
# Trachea: cross-section and distance from the body's midline.
_TRACHEA_MAX_AREA_MM2 = 700.0
_TRACHEA_MIN_AREA_MM2 = 30.0
_TRACHEA_MAX_MIDLINE_MM = 30.0
_TRACHEA_SEED_DEPTH_MM = 40.0
# Largest in-plane hole in a lung that is a vessel (filled); larger ones are the diaphragm dome.
_MAX_VESSEL_HOLE_MM2 = 1000.0
# Splitting one merged component: the cut plane must be a narrow bridge.
_MAX_BRIDGE_FRACTION = 0.15
_MIN_SPLIT_SIDE_FRACTION = 0.15


class ClassicalLungModel:
    """Threshold + connected-components lung segmentation; stateless, so safe to share between threads."""

    task: Literal["segmentation"] = "segmentation"
    accepts_modalities: tuple[str, ...] = ("CT",)

    def __init__(self, manifest: ModelManifest | None = None, device: str = "cpu") -> None:
        # Pure numpy/scipy: the device is accepted for the registry's uniform call and ignored.
        self.identity = ModelIdentity(
            name=manifest.name if manifest else MODEL_NAME,
            version=manifest.version if manifest else MODEL_VERSION,
            description="classical lung segmentation: HU threshold, connected components, midline split",
        )
        self.segments = [
            SegmentSpec(
                RIGHT_LUNG_LABEL, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG, (80, 180, 250)
            ),
            SegmentSpec(
                LEFT_LUNG_LABEL, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, (250, 200, 80)
            ),
        ]

    def segment(self, volume: Volume) -> np.ndarray:
        ornt = nib.orientations.io_orientation(volume.affine_lps)
        hu = nib.orientations.apply_orientation(volume.array.transpose(2, 1, 0), ornt)
        canonical_affine = volume.affine_lps @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape[::-1])
        voxel_mm = np.linalg.norm(canonical_affine[:3, :3], axis=0)

        lungs, body_centre = _segment_canonical(np.asarray(hu), voxel_mm)
        if not lungs:
            raise InferenceError(
                f"series {volume.series_instance_uid}: no lung found (no air component of lung size in the body)"
            )
        labels = _label_right_left(lungs, body_centre, canonical_affine)

        back = nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], ornt)
        label_xyz = nib.orientations.apply_orientation(labels, back)
        label_map = np.ascontiguousarray(np.asarray(label_xyz).transpose(2, 1, 0), dtype=np.uint8)
        if label_map.shape != volume.array.shape:
            raise InferenceError(f"series {volume.series_instance_uid}: label map shape mismatch")
        return label_map


def _segment_canonical(hu: np.ndarray, voxel_mm: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Lung masks (none, one or two, unordered) on the canonical grid (x = left, y = posterior,
    z = superior), and the body's centre of mass (voxel index) as the left-right reference."""
    voxel_ml = float(np.prod(voxel_mm)) / 1000.0
    body = _largest_component(hu > _BODY_HU)
    if not body.any():
        return [], np.zeros(3)
    body_centre = _centre_of_mass(body)
    body_filled = _fill_per_slice(body)
    air = (hu < _AIR_HU) & body_filled
    air &= ~_touching_in_plane_border(air)
    air &= ~_trachea(air, body, voxel_mm)

    components, count = cc3d.connected_components(air, connectivity=6, return_N=True)
    if count == 0:
        return [], body_centre
    sizes = _voxel_counts(components)
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] * voxel_ml >= _MIN_LUNG_ML]
    if not order:
        return [], body_centre
    largest = components == order[0]
    halves = _split_at_midline(largest)
    if halves is not None:
        lungs = list(halves)
    else:
        lungs = [largest]
        if len(order) > 1 and sizes[order[1]] >= _MIN_SECOND_LUNG_FRACTION * sizes[order[0]]:
            lungs.append(components == order[1])
    pixel_mm2 = float(voxel_mm[0] * voxel_mm[1])
    return [_tidy(lung, pixel_mm2) for lung in lungs], body_centre


def _largest_component(mask: np.ndarray) -> np.ndarray:
    return np.asarray(cc3d.largest_k(mask, k=1, connectivity=6, binary_image=True), dtype=bool)


def _voxel_counts(components: np.ndarray) -> np.ndarray:
    """Voxels per component label (index = label; background count set to 0)."""
    sizes = np.asarray(cc3d.statistics(components, no_slice_conversion=True)["voxel_counts"], dtype=np.int64)
    sizes[0] = 0
    return sizes


def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    filled = np.empty_like(mask, dtype=bool)
    for z in range(mask.shape[2]):
        filled[:, :, z] = fill_voids.fill(np.ascontiguousarray(mask[:, :, z]))
    return filled


def _touching_in_plane_border(mask: np.ndarray) -> np.ndarray:
    """Components of `mask` that reach the x/y edges (air outside the body leaking in)."""
    components, count = cc3d.connected_components(mask, connectivity=6, return_N=True)
    touching = np.zeros(count + 1, dtype=bool)
    for edge in (components[0], components[-1], components[:, 0], components[:, -1]):
        touching[np.unique(edge)] = True
    touching[0] = False
    return touching[components]


def _trachea(air: np.ndarray, body: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """Voxels of the trachea, tracked downwards from the top slices while it stays a small midline tube."""
    trachea = np.zeros_like(air, dtype=bool)
    pixel_mm2 = float(voxel_mm[0] * voxel_mm[1])
    air_slices = np.flatnonzero(air.any(axis=(0, 1)))
    if len(air_slices) == 0:
        return trachea
    top = int(air_slices[-1])
    seed_depth = max(1, int(round(_TRACHEA_SEED_DEPTH_MM / voxel_mm[2])))
    previous: np.ndarray | None = None
    for z in range(top, -1, -1):
        slice_labels, count = ndi.label(air[:, :, z])
        if count == 0:
            if previous is not None:
                break
            continue
        areas = np.bincount(slice_labels.ravel(order="K")) * pixel_mm2
        if previous is None:
            if z < top - seed_depth:
                break
            body_x = np.flatnonzero(body[:, :, z].any(axis=1))
            if len(body_x) == 0:
                continue
            midline_x = (body_x[0] + body_x[-1]) / 2.0
            centroids = ndi.center_of_mass(air[:, :, z], slice_labels, range(1, count + 1))
            candidates = [
                label
                for label, centroid in zip(range(1, count + 1), centroids, strict=True)
                if _TRACHEA_MIN_AREA_MM2 <= areas[label] <= _TRACHEA_MAX_AREA_MM2
                and abs(centroid[0] - midline_x) * voxel_mm[0] <= _TRACHEA_MAX_MIDLINE_MM
            ]
            if not candidates:
                continue
            chosen = max(candidates, key=lambda label: areas[label])
        else:
            overlapping = np.unique(slice_labels[previous & (slice_labels > 0)])
            if len(overlapping) != 1 or areas[overlapping[0]] > _TRACHEA_MAX_AREA_MM2:
                break  # the carina or a merge with a lung: stop, the rest belongs to the lungs
            chosen = int(overlapping[0])
        previous = slice_labels == chosen
        trachea[:, :, z] = previous
    return trachea


def _split_at_midline(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut one component holding both lungs at the left-right plane with the fewest voxels.

    Returns None when no narrow bridge exists (the component is a single lung).
    """
    profile = mask.sum(axis=(1, 2)).astype(np.float64)
    occupied = np.flatnonzero(profile)
    low, high = int(occupied[0]), int(occupied[-1])
    width = high - low
    if width < 4:
        return None
    # The mediastinum lies in the middle part of the lungs' left-right extent.
    start, stop = low + int(0.3 * width), low + int(0.7 * width) + 1
    cut = start + int(np.argmin(profile[start:stop]))
    if profile[cut] > _MAX_BRIDGE_FRACTION * profile.max():
        return None
    first = np.zeros_like(mask)
    second = np.zeros_like(mask)
    first[:cut] = mask[:cut]
    second[cut + 1 :] = mask[cut + 1 :]
    total = float(mask.sum())
    if min(first.sum(), second.sum()) < _MIN_SPLIT_SIDE_FRACTION * total:
        return None
    return _largest_component(first), _largest_component(second)


def _tidy(lung: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """Light in-plane closing (smooths the pleural edge), then fill vessels per axial slice.

    Only holes up to _MAX_VESSEL_HOLE_MM2 are filled: a larger in-plane hole is the top of the
    diaphragm dome (liver or spleen) seen through the lung base, which is not lung.
    """
    tidy = np.zeros_like(lung, dtype=bool)
    box = _bounding_box(lung, pad=2)
    if box is None:
        return tidy
    crop = lung[box]
    closed = ndi.binary_closing(crop, structure=np.ones((3, 3, 1), dtype=bool)) | crop
    closed = _largest_component(closed)
    max_hole_pixels = _MAX_VESSEL_HOLE_MM2 / pixel_mm2
    for z in range(closed.shape[2]):
        plane = np.ascontiguousarray(closed[:, :, z])
        holes, count = ndi.label(fill_voids.fill(plane) & ~plane)
        if count:
            sizes = np.bincount(holes.ravel(order="K"))
            small = sizes <= max_hole_pixels
            small[0] = False
            plane |= small[holes]
        closed[:, :, z] = plane
    tidy[box] = closed
    return tidy


def _bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, slice, slice] | None:
    box = []
    for axis, size in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        occupied = np.flatnonzero(mask.any(axis=others))
        if len(occupied) == 0:
            return None
        box.append(slice(max(0, int(occupied[0]) - pad), min(size, int(occupied[-1]) + 1 + pad)))
    return box[0], box[1], box[2]


def _centre_of_mass(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index of a mask (computed on its bounding box: masks are small next to the volume)."""
    box = _bounding_box(mask, pad=0)
    if box is None:
        return (np.array(mask.shape, dtype=np.float64) - 1) / 2.0
    offset = np.array([axis.start for axis in box], dtype=np.float64)
    return offset + np.array(ndi.center_of_mass(mask[box]), dtype=np.float64)


def _lps_x(canonical_affine: np.ndarray, index: np.ndarray) -> float:
    return float(canonical_affine[0, :3] @ index + canonical_affine[0, 3])


def _label_right_left(
    lungs: list[np.ndarray], body_centre: np.ndarray, canonical_affine: np.ndarray
) -> np.ndarray:
    """Label by LPS x (patient left = +x): the lung with the smaller mean x is the right lung."""
    labels = np.zeros(lungs[0].shape, dtype=np.uint8)
    mean_x = [_lps_x(canonical_affine, _centre_of_mass(lung)) for lung in lungs]
    if len(lungs) == 2:
        right, left = (0, 1) if mean_x[0] < mean_x[1] else (1, 0)
        labels[lungs[left]] = LEFT_LUNG_LABEL
        # Right written last wins on the (rare) voxels both tidied masks claim.
        labels[lungs[right]] = RIGHT_LUNG_LABEL
    else:
        # One lung only (pneumonectomy, collapse, partial field of view): its side of the body's centre.
        right_side = mean_x[0] < _lps_x(canonical_affine, body_centre)
        labels[lungs[0]] = RIGHT_LUNG_LABEL if right_side else LEFT_LUNG_LABEL
    return labels
