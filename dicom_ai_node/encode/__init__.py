"""Result encoding: DICOM SEG and TID 1500 SR for a segmentation result (the only highdicom user).

Typical use by the worker::

    uids = result_uids(series_uid, model, rule, revision=revision)
    common = dict(source_datasets=headers, model=model, rule=rule, identity=identity, uids=uids)
    seg = encode_seg(label_map=label_map, segments=segments, **common)   # None: nothing found
    measurements = measure(label_map, segments, voxel_mm3)   # from the volume loader's geometry
    sr = encode_sr(seg=seg, measurements=measurements, segments=segments, **common)

The encoders take keyword arguments only: several of their parameters share a type (identities,
sequences of datasets or specs), and a swapped positional argument would still type-check.
"""

from dicom_ai_node.encode.io import write_dataset
from dicom_ai_node.encode.measure import label_counts, measure
from dicom_ai_node.encode.seg import display_cielab, encode_seg, segment_numbers
from dicom_ai_node.encode.sr import encode_sr
from dicom_ai_node.encode.uids import deterministic_uid, result_uids, segment_tracking_uid

__all__ = [
    "deterministic_uid",
    "display_cielab",
    "encode_seg",
    "encode_sr",
    "label_counts",
    "measure",
    "result_uids",
    "segment_numbers",
    "segment_tracking_uid",
    "write_dataset",
]
