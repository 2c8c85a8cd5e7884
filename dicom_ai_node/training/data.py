"""The real chest CTs reachable here and their reference lung masks.

Source: the pyradiomics 3.0.1 source distribution (BSD-3-Clause) ships two chest CTs with a tumour label,
`data/lung1_image.nrrd` (512 x 512 x 48, 0.57 mm pixels, 5 mm slices) and `data/lung2_image.nrrd`
(512 x 512 x 61, 0.63 mm, 5 mm), pyradiomics' own test cases (its data/README.md says no more about
their origin; both show a lung tumour). scripts/fetch-test-data.sh puts the sdist into the test-data cache
(`$AINODE_TEST_DATA` or ~/.cache/dicom-ai-node/test-data); the NRRDs are extracted from it on first use.

Reference masks (label 1 right lung, 2 left lung) live in tests/data/references/<case>_lungs.nrrd on the
NRRD's own voxel grid and geometry. dicom_ai_node.training.references builds them (the classical baseline
plus the tumour label, by the rule documented there); they were checked by eye on the overlays in
docs/images/ct-lung-reference-*.png.

Geometry: the NRRDs are LPS with axis-aligned directions: axis 0 runs along the DICOM columns, axis 1
along the rows, axis 2 between frames (feet to head). A Volume array is (frames, rows, cols), so the
NRRD array is transposed (2, 1, 0) and its space directions/origin are the Volume's affine_lps, exactly
as dicom_ai_node/devtools/datasets.lung_ct_series writes them as DICOM.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from dicom_ai_node.infer.volume import Volume

REAL_CASES = ("lung1", "lung2")
PYRADIOMICS_SDIST = "pyradiomics-3.0.1.tar.gz"
PYRADIOMICS_DATA = Path("pyradiomics-3.0.1") / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCES_DIR = REPO_ROOT / "tests" / "data" / "references"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DataMissingError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


def data_cache_dir() -> Path:
    """The test-data cache: `$AINODE_TEST_DATA` or ~/.cache/dicom-ai-node/test-data."""
    env = os.environ.get("AINODE_TEST_DATA")
    return Path(env) if env else Path.home() / ".cache" / "dicom-ai-node" / "test-data"


def nrrd_path(name: str) -> Path:
    """Path of e.g. `lung1_image.nrrd` in the cache, extracted from the cached sdist if needed."""
    cache = data_cache_dir()
    path = cache / PYRADIOMICS_DATA / name
    if path.is_file():
        return path
    sdist = cache / PYRADIOMICS_SDIST
    if not sdist.is_file():
        raise DataMissingError(f"{path} not found: run scripts/fetch-test-data.sh (cache dir {cache})")
    with tarfile.open(sdist, "r:gz") as tar:
        tar.extract(f"{PYRADIOMICS_DATA.as_posix()}/{name}", cache, filter="data")
    return path


def real_data_available() -> bool:
    try:
        for case in REAL_CASES:
            nrrd_path(f"{case}_image.nrrd")
    except (DataMissingError, OSError, tarfile.TarError, KeyError):
        return False
    return True


def nrrd_affine_lps(header: dict[str, Any]) -> np.ndarray:
    """(axis0, axis1, axis2, 1) -> LPS mm from an NRRD header; refuses what cannot be mapped."""
    space = str(header.get("space", ""))
    if space not in ("left-posterior-superior", "right-anterior-superior"):
        raise ValueError(f"unsupported NRRD space {space!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # one vector per axis
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    if space == "right-anterior-superior":
        affine = RAS_TO_LPS @ affine
    return affine


def volume_from_array(hu_xyz: np.ndarray, affine_lps: np.ndarray, description: str = "CHEST CT") -> Volume:
    """A Volume from an array indexed (col, row, frame) and its voxel -> LPS affine.

    The datasets are one minimal shared header (series UID, modality): enough for models that only read
    geometry and pixels, as training and evaluation do.
    """
    array = np.ascontiguousarray(np.asarray(hu_xyz, dtype=np.float32).transpose(2, 1, 0))
    header = pydicom.Dataset()
    header.SeriesInstanceUID = generate_uid(entropy_srcs=[description])
    header.Modality = "CT"
    header.SeriesDescription = description
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    return Volume(
        array=array,
        datasets=[header] * array.shape[0],
        paths=[],
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        affine_lps=np.asarray(affine_lps, dtype=np.float64),
        modality="CT",
    )


def load_real_ct(case: str) -> Volume:
    """`lung1` or `lung2` as a Volume in HU (the same grid the DICOM test series have)."""
    import nrrd  # pynrrd: a dev dependency, needed only for training and evaluation

    if case not in REAL_CASES:
        raise ValueError(f"case must be one of {REAL_CASES}, not {case!r}")
    hu, header = nrrd.read(str(nrrd_path(f"{case}_image.nrrd")))
    return volume_from_array(hu, nrrd_affine_lps(header), description=case)


def reference_path(case: str, references_dir: Path = REFERENCES_DIR) -> Path:
    return references_dir / f"{case}_lungs.nrrd"


def load_reference(case: str, references_dir: Path = REFERENCES_DIR) -> np.ndarray:
    """The stored reference label map of `case` as uint8 (frames, rows, cols): 1 right, 2 left lung."""
    import nrrd

    path = reference_path(case, references_dir)
    if not path.is_file():
        raise DataMissingError(
            f"{path} not found: build it with `python -m dicom_ai_node.training.references`"
        )
    labels, _ = nrrd.read(str(path))
    return np.ascontiguousarray(np.asarray(labels, dtype=np.uint8).transpose(2, 1, 0))


def save_reference(case: str, label_map: np.ndarray, references_dir: Path = REFERENCES_DIR) -> Path:
    """Store a (frames, rows, cols) label map as a gzip NRRD with the source image's geometry."""
    import nrrd

    source = nrrd.read_header(str(nrrd_path(f"{case}_image.nrrd")))
    header = {
        "space": source["space"],
        "space directions": source["space directions"],
        "space origin": source["space origin"],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "label values": "0 background, 1 right lung, 2 left lung",
    }
    path = reference_path(case, references_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(label_map.astype(np.uint8).transpose(2, 1, 0))
    nrrd.write(str(path), data, header, compression_level=9)
    # pynrrd stamps the write time into a comment; drop it so a rebuild of the same mask is byte-identical.
    raw = path.read_bytes()
    head, sep, body = raw.partition(b"\n\n")
    lines = [line for line in head.split(b"\n") if not line.startswith(b"# on ")]
    path.write_bytes(b"\n".join(lines) + sep + body)
    return path
