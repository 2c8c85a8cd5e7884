"""Evaluation datasets: the folder layouts `dicom-ai-node evaluate` reads, and loading one case.

Layouts (detected in this order; docs/evaluation.md has examples):

1. Classification, `labels.csv` at the top:
       labels.csv              case,finding,label     (long form: one row per case and finding, 0/1)
                               or case,<finding>,...  (wide form: one 0/1 column per finding)
       <case>/                 a DICOM series (any file names, nested folders allowed)
       <case>.dcm              or a single DICOM image (CR/DX/MG without patient geometry is fine)
       images/<case>.nii.gz    or a NIfTI/NRRD image (also <case>.dcm here)
   A finding is named by its code meaning ("Pneumothorax"), code value ("36118008") or
   "SCHEME:value" ("SCT:36118008"). Empty cells are "not labelled" and the case is left out of that
   finding's statistics. Every case in labels.csv needs an image; images without a row are skipped.

2. Segmentation, NIfTI/NRRD pairs:
       images/<case>.nii.gz | .nii | .nrrd | .nhdr
       labels/<case>.nii.gz | .nii | .nrrd | .nhdr     0 = background, values = model label values
   Every image needs a label file of the same case name and vice versa.

3. Segmentation, DICOM: one folder per case (the folder name is the case name)
       <case>/...              the source series (any files; other series are allowed if the SEG
                               references one of them)
       <case>/reference/...    the reference DICOM SEG (Segmentation Storage), here or anywhere in <case>
   Files that are not DICOM are ignored; exactly one SEG per case.

Optional `dataset.yaml` at the top (all keys optional):
       name: Chest CT validation set 2025-06      # shown in the report (default: the folder name)
       description: 40 consecutive ...            # free text for the report
       modality: CT                               # of NIfTI/NRRD images (default: the model's first)
       segments: {"Lung, right": Right lung, 3: 1, Trachea: null}   # reference -> model segment
       missing_reference: empty                   # a model segment absent from a reference: empty | skip
       findings: {PTX: Pneumothorax}              # labels.csv finding -> model finding

Case names come from folder and file names only, never from DICOM headers, so the report carries no
patient identity as long as the folders are named with pseudonyms.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pydicom
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from dicom_ai_node.domain.results import FindingSpec, SegmentSpec
from dicom_ai_node.evaluate.images import (
    has_patient_geometry,
    image_stem,
    is_image_file,
    projection_volume,
    volume_from_image_file,
)
from dicom_ai_node.evaluate.reference import DatasetError, Reference, label_image_reference, seg_reference
from dicom_ai_node.infer.volume import Volume, load_series

SEG_SOP_CLASS_UIDS = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
LABELS_CSV = "labels.csv"
DATASET_YAML = "dataset.yaml"
Layout = Literal["classification", "image-pairs", "dicom"]
_TRUE = {"1", "true", "yes", "positive", "present"}
_FALSE = {"0", "false", "no", "negative", "absent"}


class DatasetConfig(BaseModel):
    """dataset.yaml (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    description: str = ""
    modality: str | None = None
    segments: dict[int | str, int | str | None] = Field(default_factory=dict)
    missing_reference: Literal["empty", "skip"] = "empty"
    findings: dict[str, str | None] = Field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str
    image: Path  # a DICOM folder, a single DICOM file, or a NIfTI/NRRD file
    label_image: Path | None = None  # image-pairs layout
    truth: dict[str, int] = field(default_factory=dict)  # classification: labels.csv finding -> 0/1


@dataclass
class EvaluationDataset:
    root: Path
    layout: Layout
    config: DatasetConfig
    cases: list[Case]
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name or self.root.name

    @property
    def task(self) -> Literal["segmentation", "classification"]:
        return "classification" if self.layout == "classification" else "segmentation"


def open_dataset(root: Path) -> EvaluationDataset:
    """Detect the layout and list the cases; DatasetError when there is nothing usable or it is malformed."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset {root}: not a folder")
    config = _read_config(root / DATASET_YAML)
    if (root / LABELS_CSV).is_file():
        dataset = _classification_dataset(root, config)
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        dataset = EvaluationDataset(root, "image-pairs", config, _image_pairs(root))
    else:
        folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        dataset = EvaluationDataset(root, "dicom", config, [Case(p.name, p) for p in folders])
    if not dataset.cases:
        raise DatasetError(
            f"dataset {root}: no cases found (expected case folders with a DICOM series and a reference SEG, "
            f"images/ + labels/, or {LABELS_CSV}; see docs/evaluation.md)"
        )
    return dataset


def load_segmentation_case(
    case: Case, dataset: EvaluationDataset, segments: Sequence[SegmentSpec], default_modality: str
) -> tuple[Volume, Reference]:
    """The case's volume and its reference masks on the volume's grid."""
    mapping = dataset.config.segments
    if case.label_image is not None:
        volume = volume_from_image_file(case.image, case.name, dataset.config.modality or default_modality)
        return volume, label_image_reference(case.label_image, volume, segments, mapping)
    series_paths, seg_path = scan_dicom_folder(case.image, need_seg=True)
    assert seg_path is not None  # need_seg
    volume = load_series(series_paths)
    return volume, seg_reference(seg_path, volume, segments, mapping)


def load_classification_volume(case: Case, dataset: EvaluationDataset, default_modality: str) -> Volume:
    if case.image.is_dir():
        series_paths, _ = scan_dicom_folder(case.image, need_seg=False)
        return load_series(series_paths)
    if is_image_file(case.image):
        return volume_from_image_file(case.image, case.name, dataset.config.modality or default_modality)
    ds = _read_header(case.image)
    if ds is None:
        raise DatasetError(f"case {case.name}: {case.image.name} is not a DICOM file")
    return load_series([case.image]) if has_patient_geometry(ds) else projection_volume(case.image)


def scan_dicom_folder(folder: Path, *, need_seg: bool) -> tuple[list[Path], Path | None]:
    """(files of the source series, the reference SEG) found anywhere under `folder`."""
    series: dict[str, list[Path]] = {}
    segs: list[tuple[Path, pydicom.Dataset]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = _read_header(path)
        if ds is None:
            continue
        if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASS_UIDS:
            segs.append((path, ds))
        elif ds.get("Rows") is not None and ds.get("SeriesInstanceUID") is not None:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    if need_seg and not segs:
        raise DatasetError(f"case {folder.name}: no reference DICOM SEG in the folder")
    if len(segs) > 1:
        raise DatasetError(f"case {folder.name}: {len(segs)} DICOM SEGs; keep one reference per case")
    if not series:
        raise DatasetError(f"case {folder.name}: no DICOM image series in the folder")
    seg_path, seg_ds = segs[0] if segs else (None, None)
    if len(series) == 1:
        return next(iter(series.values())), seg_path
    referenced = {
        str(item.get("SeriesInstanceUID", ""))
        for item in (seg_ds.get("ReferencedSeriesSequence", []) if seg_ds is not None else [])
    }
    chosen = [uid for uid in series if uid in referenced]
    if len(chosen) != 1:
        raise DatasetError(
            f"case {folder.name}: {len(series)} image series and the reference SEG does not pick one: "
            "keep one series per case folder"
        )
    return series[chosen[0]], seg_path


def match_findings(
    names: Sequence[str], findings: Sequence[FindingSpec], config: DatasetConfig
) -> tuple[dict[str, int], list[str]]:
    """labels.csv finding name -> index into the model's findings, and warnings for names left out.

    Several names may name one finding ("Pneumothorax", "SCT:36118008"); a case that gives them
    different labels fails on its own (see `truth_by_finding`).
    """
    matched: dict[str, int] = {}
    warnings: list[str] = []
    for name in names:
        target = config.findings.get(name, name)
        if target is None:
            continue  # dataset.yaml says: not this model's concern
        key = target.casefold()
        for index, spec in enumerate(findings):
            code = spec.finding
            if key in (
                code.meaning.casefold(),
                code.value.casefold(),
                f"{code.scheme_designator}:{code.value}".casefold(),
            ):
                matched[name] = index
                break
        else:
            warnings.append(f"{LABELS_CSV} finding '{name}' is no finding of the model: ignored")
    if not matched:
        known = ", ".join(f.finding.meaning for f in findings)
        raise DatasetError(f"{LABELS_CSV} names no finding of the model (it scores: {known})")
    return matched, warnings


def truth_by_finding(case: Case, matched: dict[str, int]) -> dict[int, int]:
    """The case's reference label per model finding index (findings without a label are left out)."""
    truth: dict[int, int] = {}
    for name, index in matched.items():
        if name in case.truth:
            if truth.get(index, case.truth[name]) != case.truth[name]:
                raise DatasetError(f"case {case.name}: {LABELS_CSV} gives one finding two different labels")
            truth[index] = case.truth[name]
    return truth


def _read_config(path: Path) -> DatasetConfig:
    if not path.is_file():
        return DatasetConfig()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return DatasetConfig.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DatasetError(f"{path}: {key}: {first['msg']}") from exc


def _image_pairs(root: Path) -> list[Case]:
    images = {image_stem(p): p for p in sorted((root / "images").iterdir()) if is_image_file(p)}
    labels = {image_stem(p): p for p in sorted((root / "labels").iterdir()) if is_image_file(p)}
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise DatasetError(f"dataset {root}: cases without both image and label file: {', '.join(unpaired)}")
    return [Case(name, images[name], label_image=labels[name]) for name in sorted(images)]


def _classification_dataset(root: Path, config: DatasetConfig) -> EvaluationDataset:
    truths = _read_labels_csv(root / LABELS_CSV)
    images: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.name in (LABELS_CSV, DATASET_YAML):
            continue
        if path.is_dir() and path.name == "images":
            images.update({image_stem(p): p for p in sorted(path.iterdir()) if p.is_file()})
        else:
            images[image_stem(path)] = path
    missing = sorted(set(truths) - set(images))
    if missing:
        raise DatasetError(f"{root / LABELS_CSV}: no image for cases {', '.join(missing)}")
    dataset = EvaluationDataset(
        root, "classification", config, [Case(n, images[n], truth=truths[n]) for n in sorted(truths)]
    )
    unlabelled = sorted(set(images) - set(truths))
    if unlabelled:
        dataset.warnings.append(f"{len(unlabelled)} images without a row in {LABELS_CSV} were not evaluated")
    return dataset


def _read_labels_csv(path: Path) -> dict[str, dict[str, int]]:
    """case -> {finding -> 0/1}, from the long (case,finding,label) or wide (case,<finding>...) form."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    lower = {h.casefold(): h for h in header}
    if "case" not in lower:
        raise DatasetError(f"{path}: needs a header row with a 'case' column (got {header or 'nothing'})")
    long_form = {"finding", "label"} <= set(lower)
    truths: dict[str, dict[str, int]] = {}
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        case = row[lower["case"]]
        if not case:
            raise DatasetError(f"{path}:{line}: empty case name")
        cells = (
            {row[lower["finding"]]: row[lower["label"]]}
            if long_form
            else {h: row[h] for h in header if h.casefold() != "case"}
        )
        for finding, cell in cells.items():
            if cell == "":
                continue
            value = 1 if cell.casefold() in _TRUE else 0 if cell.casefold() in _FALSE else None
            if value is None or not finding:
                raise DatasetError(f"{path}:{line}: label {cell!r} for finding {finding!r} is not 0/1")
            known = truths.setdefault(case, {})
            if known.get(finding, value) != value:
                raise DatasetError(f"{path}:{line}: case {case} has conflicting labels for {finding!r}")
            known[finding] = value
    if not truths:
        raise DatasetError(f"{path}: no labelled cases")
    return truths


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file, or None for anything else (README, checksums, DICOMDIR's siblings)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (PydicomInvalidDicomError, OSError, ValueError, EOFError, TypeError):
        return None
