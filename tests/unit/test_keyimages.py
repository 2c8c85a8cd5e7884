from __future__ import annotations

import numpy as np

from dicom_ai_node.domain.results import SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, SegmentSpec
from dicom_ai_node.encode.keyimages import render_overlay, select_key_frames

SEG = SegmentSpec(2, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, (230, 170, 50))


def test_key_frames_spread_over_the_mask() -> None:
    labels = np.zeros((40, 8, 8), np.uint8)
    labels[10:31, 2:5, 2:5] = 2
    frames = select_key_frames(labels, max_images=5)
    assert len(frames) == 5 and all(10 <= f <= 30 for f in frames) and 20 in frames
    assert select_key_frames(np.zeros((3, 4, 4), np.uint8)) == []
    small = np.zeros((10, 4, 4), np.uint8)
    small[4:6] = 1
    assert select_key_frames(small) == [4, 5]


def test_overlay_colours_only_the_mask_and_outlines_it() -> None:
    values = np.full((32, 32), -1000.0)
    labels = np.zeros((32, 32), np.uint8)
    labels[8:24, 8:24] = 2
    rgb = render_overlay(values, labels, [SEG], "CT")
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == rgb[0, 0, 0]).all()  # outside: gray
    assert tuple(rgb[8, 8]) == SEG.rgb  # contour in the segment colour
    inside = rgb[16, 16].astype(int)
    assert inside[0] > inside[2]  # fill tinted towards the colour
