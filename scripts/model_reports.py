"""Build the validation sets of the built-in models from the real images reachable here and run
`dicom-ai-node evaluate` on them; the reports land in docs/reports/<model>/.

- mr-brain: the ch2 T1 MR (Debian mricron-data) written as a DICOM series, with ch2bet (the
  brain-extracted ch2 from the same package) as the reference SEG.
- ct-lung and its baseline ct-lung-classical: the pyradiomics lung1 and lung2 chest CTs written as DICOM
  series, with the reference lung masks committed under tests/data/references (built by
  dicom_ai_node.training.references and checked by eye: docs/images/ct-lung-reference-*.png) as SEGs.

Every case goes through the same DICOM path as in the node: series files -> load_series -> model ->
label map on the source grid, compared with the reference SEG decoded onto that grid.

    .venv/bin/python scripts/model_reports.py [--models mr-brain ct-lung ct-lung-classical] [--out docs/reports]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_ai_node.domain.results import (  # noqa: E402
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BRAIN,
    SCT_LEFT_LUNG,
    SCT_RIGHT_LUNG,
    ModelIdentity,
    OutputIdentity,
    RuleIdentity,
    SegmentSpec,
)
from dicom_ai_node.encode.seg import encode_seg  # noqa: E402
from dicom_ai_node.encode.uids import result_uids  # noqa: E402

REFERENCE = ModelIdentity("reference", "1")
RULE = RuleIdentity("validation", 1)


def write_reference_seg(
    case_dir: Path, series_paths: Sequence[Path], label_map: np.ndarray, segments: list[SegmentSpec]
) -> None:
    """The reference mask as a SEG of the case's series (frames in the order the series files are given)."""
    headers = [dcmread(p, stop_before_pixels=True) for p in series_paths]
    uids = result_uids(str(headers[0].SeriesInstanceUID), REFERENCE, RULE)
    seg = encode_seg(
        source_datasets=headers,
        label_map=label_map,
        segments=segments,
        model=REFERENCE,
        rule=RULE,
        identity=OutputIdentity(),
        uids=uids,
        omit_empty_frames=False,
    )
    assert seg is not None, "reference mask is empty"
    (case_dir / "reference").mkdir(parents=True, exist_ok=True)
    seg.save_as(case_dir / "reference" / "reference-seg.dcm", enforce_file_format=True)


def brain_set(dataset: Path) -> Path:
    from dicom_ai_node.devtools.datasets import ch2_mr_series

    case = dataset / "ch2"
    info = ch2_mr_series(case / "series")
    brain = SegmentSpec(1, "Brain", SCT_ANATOMICAL_STRUCTURE, SCT_BRAIN, (255, 160, 80))
    write_reference_seg(case, info.paths, info.reference_mask.astype(np.uint8), [brain])
    (dataset / "dataset.yaml").write_text(
        "name: ch2 T1 brain MR (mricron-data)\n"
        "description: ch2 T1 (1 mm, 181 x 217 x 181) written as DICOM; reference = ch2bet > 0\n"
    )
    return dataset


def lung_set(dataset: Path) -> Path:
    from dicom_ai_node.devtools.datasets import lung_ct_series
    from dicom_ai_node.training.data import load_reference

    segments = [
        SegmentSpec(1, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG, (80, 180, 250)),
        SegmentSpec(2, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, (250, 200, 80)),
    ]
    for case in ("lung1", "lung2"):
        info = lung_ct_series(dataset / case / "series", case)
        reference = load_reference(case)
        if reference.shape != (len(info.paths), *reference.shape[1:]):
            raise SystemExit(
                f"{case}: reference shape {reference.shape} does not fit {len(info.paths)} frames"
            )
        write_reference_seg(dataset / case, info.paths, reference, segments)
    (dataset / "dataset.yaml").write_text(
        "name: pyradiomics chest CTs lung1 + lung2\n"
        "description: real chest CTs (512 x 512 x 48 / 61, 5 mm) from the pyradiomics 3.0.1 sdist, written as "
        "DICOM; references = committed lung masks (tests/data/references), checked by eye\n"
    )
    return dataset


SETS = {"mr-brain": brain_set, "ct-lung": lung_set, "ct-lung-classical": lung_set}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reports")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from dicom_ai_node.evaluate.run import evaluate

    with tempfile.TemporaryDirectory(prefix="ainode-validation-") as tmp:
        built: dict[str, Path] = {}
        for model in args.models:
            builder = SETS[model]
            key = builder.__name__
            if key not in built:
                built[key] = builder(Path(tmp) / key)
            out = args.out / model
            shutil.rmtree(out, ignore_errors=True)
            evaluate(model, built[key], out, device=args.device)
            print(f"{model}: report in {out}")


if __name__ == "__main__":
    main()
