"""Key images with the overlay burned in, for PACS viewers that cannot show DICOM SEG.

Secondary Capture (RGB) of a few slices with mask, marked as derived everywhere a reader looks: ImageType
DERIVED\\SECONDARY, BurnedInAnnotation YES, a series description and a derivation description saying so.
They are a convenience view, not the result: the SEG and SR are.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from dicom_ai_node.domain.results import ModelIdentity, OutputIdentity, SegmentSpec
from dicom_ai_node.encode._common import (
    LONG_STRING_MAX,
    contributing_equipment,
    no_phi_warnings,
    with_type2_identity,
)
from dicom_ai_node.encode.uids import deterministic_uid
from dicom_ai_node.errors import EncodeError

MAX_KEY_IMAGES = 5
FILL_ALPHA = 0.35
# CT lung window (W 1500 / L -600) shows both lung parenchyma and soft tissue; other modalities use
# the slice's 1st-99th percentile.
CT_WINDOW = (-600.0, 1500.0)


def select_key_frames(label_map: npt.NDArray[np.integer], max_images: int = MAX_KEY_IMAGES) -> list[int]:
    """Frames with mask, spread evenly over the mask's extent (the middle one always included)."""
    frames = np.flatnonzero(label_map.reshape(label_map.shape[0], -1).any(axis=1))
    if frames.size == 0:
        return []
    picks = np.linspace(0, frames.size - 1, num=min(max_images, frames.size) + 2)[1:-1]
    return sorted({int(frames[int(round(p))]) for p in picks})


def _to_gray(values: npt.NDArray[np.floating], modality: str) -> npt.NDArray[np.uint8]:
    if modality == "CT":
        centre, width = CT_WINDOW
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = (float(v) for v in np.percentile(values, [1, 99]))
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255
    gray: npt.NDArray[np.uint8] = scaled.astype(np.uint8)
    return gray


def render_overlay(
    values: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    segments: Sequence[SegmentSpec],
    modality: str,
) -> npt.NDArray[np.uint8]:
    """One slice as RGB: windowed grayscale, each segment filled translucently with a solid contour."""
    rgb = np.repeat(_to_gray(values, modality)[..., None], 3, axis=2).astype(np.float32)
    for spec in segments:
        mask = labels == spec.label_value
        if not mask.any():
            continue
        colour = np.array(spec.rgb, dtype=np.float32)
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
        contour = mask & ~ndimage.binary_erosion(mask)
        rgb[contour] = colour
    return rgb.round().astype(np.uint8)


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    """PS3.3 C.7.6.1.1.1: direction letters of the row and column axes from ImageOrientationPatient."""
    iop = [float(v) for v in ds.ImageOrientationPatient]

    def letters(vector: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = sorted(range(3), key=lambda i: -abs(vector[i]))
        out = [names[i][0] if vector[i] > 0 else names[i][1] for i in order if abs(vector[i]) > 0.25]
        return "".join(out) or "L"

    return letters(iop[:3]), letters(iop[3:])


def encode_key_images(
    *,
    values: npt.NDArray[np.floating],
    source_datasets: Sequence[Dataset],
    label_map: npt.NDArray[np.integer],
    segments: Sequence[SegmentSpec],
    model: ModelIdentity,
    identity: OutputIdentity,
    result_key: str,
    revision: int = 1,
) -> list[Dataset]:
    """Secondary Capture key images of the slices in `select_key_frames`; UIDs derive from `result_key`."""
    if values.shape != label_map.shape or len(source_datasets) != label_map.shape[0]:
        raise EncodeError("key images: values, labels and source headers are not on one grid")
    series_uid = deterministic_uid(result_key, "key-images-series")
    suffix = f" rev {revision}" if revision > 1 else ""
    description = f"AI key images {model.name} (derived){suffix}"[:LONG_STRING_MAX]
    images: list[Dataset] = []
    for number, k in enumerate(select_key_frames(label_map), start=1):
        ref = with_type2_identity(source_datasets[k])
        modality = str(ref.get("Modality", ""))
        try:
            with no_phi_warnings():
                sc = hd.sc.SCImage.from_ref_dataset(
                    ref_dataset=ref,
                    pixel_array=render_overlay(values[k], label_map[k], segments, modality),
                    photometric_interpretation="RGB",
                    bits_allocated=8,
                    coordinate_system="PATIENT",
                    series_instance_uid=series_uid,
                    series_number=identity.sr_series_number + 1,
                    sop_instance_uid=deterministic_uid(result_key, "key-image", str(k)),
                    instance_number=number,
                    manufacturer=identity.manufacturer,
                    # highdicom annotates this as ints; PixelSpacing is decimal (DS).
                    pixel_spacing=(float(ref.PixelSpacing[0]), float(ref.PixelSpacing[1])),  # type: ignore[arg-type]
                    patient_orientation=_patient_orientation(ref),
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    series_description=description,
                    manufacturer_model_name=identity.manufacturer_model_name,
                    software_versions=identity.software_versions,
                    device_serial_number=identity.device_serial_number,
                    contributing_equipment=contributing_equipment(identity, model),
                )
        except (ValueError, TypeError, AttributeError) as exc:
            raise EncodeError(f"cannot encode key image {number}: {exc}") from exc
        # Derived and burned in: a reader must never take these for the acquired images.
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "YES"
        # General Series Laterality is Type 2C (paired body parts); present and empty: not known here.
        sc.Laterality = ref.get("Laterality", "")
        sc.DerivationDescription = (
            f"Burned-in overlay of the {model.name} {model.version} segmentation; not for primary diagnosis"
        )[:1024]
        source_item = Dataset()
        source_item.ReferencedSOPClassUID = ref.SOPClassUID
        source_item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        sc.SourceImageSequence = [source_item]
        images.append(sc)
    return images
