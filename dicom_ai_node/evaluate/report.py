"""The evaluation report: evaluation.json (machine-readable), report.md and report.html (for people),
plus summary PNGs under plots/.

The report is written for a clinical lead deciding on go-live: what was tested (dataset, model identity
with weights sha256, licence, intended use), how well (per label / finding with spread and intervals,
per case), what it looks like (plots, overlays worst case first) and what the numbers cannot say
(limits). Markdown and HTML come from one list of sections, so they never disagree.

JSON: numpy values become plain numbers and undefined values (HD95 with an empty mask, a rate with a
zero denominator, the ROC's first threshold) become null, so strict JSON parsers read it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dicom_ai_node.evaluate import plots
from dicom_ai_node.evaluate.render import Block, Row, Section, to_html, to_markdown


def finish_report(results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Add plots and limits to `results`, write evaluation.json, report.md, report.html; return the
    JSON-safe results (what evaluation.json holds)."""
    results["plots"] = _summary_plots(results, out_dir)
    results["limits"] = _limits(results)
    safe: dict[str, Any] = jsonable(results)
    (out_dir / "evaluation.json").write_text(json.dumps(safe, indent=2, allow_nan=False), encoding="utf-8")
    sections = _sections(safe)
    title = f"Evaluation of {safe['model']['name']} {safe['model']['version']} on {safe['dataset']['name']}"
    (out_dir / "report.md").write_text(to_markdown(title, sections), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(title, sections), encoding="utf-8")
    return safe


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return value.as_posix()
    return value


def _summary_plots(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    made: dict[str, Path] = {}
    ok = [c for c in results["cases"] if c["status"] == "ok"]
    if results["task"] == "segmentation" and ok:
        by_label: dict[str, list[dict[str, Any]]] = {}
        for case in ok:
            for s in case["labels"]:
                by_label.setdefault(s["label"], []).append(s)
        made["dice"] = plots.strip_chart(
            {k: [s["dice"] for s in v] for k, v in by_label.items()},
            "Dice per case",
            "Dice",
            out_dir / "plots" / "dice.png",
        )
        made["hd95"] = plots.strip_chart(
            {k: [s["hd95_mm"] for s in v] for k, v in by_label.items()},
            "HD95 per case",
            "HD95 (mm)",
            out_dir / "plots" / "hd95.png",
        )
        made["volumes"] = plots.volume_scatter(
            {k: [(s["reference_cm3"], s["prediction_cm3"]) for s in v] for k, v in by_label.items()},
            out_dir / "plots" / "volumes.png",
        )
    elif results["task"] == "classification":
        scored = [f for f in results["findings"] if f["n"]]
        curves = {
            f["finding"]: (f["roc"]["fpr"], f["roc"]["tpr"], f["auc"]["value"]) for f in scored if f["roc"]
        }
        if curves:
            made["roc"] = plots.roc_figure(curves, out_dir / "plots" / "roc.png")
        if scored:
            made["scores"] = plots.score_strips(
                {
                    f["finding"]: (f["scores"]["probability"], f["scores"]["truth"], f["threshold"])
                    for f in scored
                },
                out_dir / "plots" / "scores.png",
            )
    return {k: p.relative_to(out_dir).as_posix() for k, p in made.items()}


def _limits(results: dict[str, Any]) -> list[str]:
    data, model = results["dataset"], results["model"]
    limits = [
        f"Retrospective evaluation on {data['n_evaluated']} case(s) of '{data['name']}'. The numbers describe "
        "this dataset; scanners, protocols or patient groups that it does not contain may fare differently."
    ]
    if data["n_failed"]:
        limits.append(
            f"{data['n_failed']} case(s) could not be evaluated and are not in the statistics (see Failed cases)."
        )
    if data["n_evaluated"] < 30:
        limits.append(
            "Fewer than 30 cases: means and rates are uncertain; read the spread and the intervals."
        )
    if results["task"] == "segmentation":
        limits.append(
            "One reference segmentation per case: reader variability is not measured, so differences smaller "
            "than it (often a few Dice points, 1-2 voxels of HD95) are not meaningful."
        )
        for label in results["labels"]:
            undefined = label["hd95_mm"]["n_undefined"]
            if undefined:
                limits.append(
                    f"{label['label']}: HD95 undefined in {undefined} case(s) (one mask empty); the HD95 "
                    "statistics leave them out, while Dice counts them as 0."
                )
        if data["missing_reference"] == "empty":
            limits.append("A model segment absent from a case's reference counts as an empty reference.")
        resampled = sum(
            1
            for c in results["cases"]
            if any("resampled" in n or "mapped by" in n for n in c.get("notes", []))
        )
        if resampled:
            limits.append(
                f"{resampled} case(s) had their reference resampled nearest-neighbour onto the image grid."
            )
    else:
        limits.append(
            "Intervals are 95% Wilson (proportions) and Hanley-McNeil (AUC) approximations; rates at the model's "
            "threshold depend on the prevalence in this dataset (precision especially)."
        )
    if model.get("limits"):
        limits.append(f"The model's own stated limits: {model['limits']}")
    limits.append("A local validation aid, not a regulatory performance study or a diagnostic claim.")
    return limits


def _sections(r: dict[str, Any]) -> list[Section]:
    data, model = r["dataset"], r["model"]
    sections: list[Section] = [
        (
            "Summary",
            [
                Block(
                    "p",
                    [
                        f"{r['task'].capitalize()} model evaluated on {data['n_evaluated']} of {data['n_cases']} "
                        f"case(s) on {r['device']}, {r['started']} to {r['finished']}, dicom-ai-node "
                        f"{r['tool']['version']}; inference {_f(r['timing_s']['mean_inference'], 2)} s per case "
                        "on average.",
                    ],
                ),
                _segmentation_summary(r) if r["task"] == "segmentation" else _classification_summary(r),
            ],
        ),
        ("Model", [Block("table", _model_rows(model), ("", ""))]),
        (
            "Dataset",
            [
                Block(
                    "table",
                    [
                        ("name", data["name"]),
                        ("description", data["description"] or "-"),
                        ("layout", data["layout"]),
                        ("path", data["path"]),
                        (
                            "cases",
                            f"{data['n_cases']} ({data['n_evaluated']} evaluated, {data['n_failed']} failed)",
                        ),
                        ("modalities", ", ".join(data["modalities"]) or "-"),
                    ],
                    ("", ""),
                ),
                *([Block("list", data["warnings"])] if data["warnings"] else []),
            ],
        ),
    ]
    if r["plots"]:
        sections.append(("Plots", [Block("images", [(p, k) for k, p in r["plots"].items()])]))
    sections.append(("Per-case results", [_case_table(r)]))
    failed = [c for c in r["cases"] if c["status"] != "ok"]
    if failed:
        sections.append(
            ("Failed cases", [Block("table", [(c["case"], c["error"]) for c in failed], ("case", "error"))])
        )
    overlays = sorted(
        (c for c in r["cases"] if c.get("overlay")),
        key=lambda c: min((s["dice"] for s in c["labels"]), default=1.0),
    )
    if overlays:
        sections.append(
            ("Overlays (lowest Dice first)", [Block("images", [(c["overlay"], c["case"]) for c in overlays])])
        )
    sections.append(("What the metrics mean", [Block("list", _definitions(r["task"]))]))
    sections.append(("Limits", [Block("list", r["limits"])]))
    return sections


def _segmentation_summary(r: dict[str, Any]) -> Block:
    header = (
        "label",
        "cases",
        "Dice mean / median / min",
        "HD95 mm mean / median / max",
        "volume error % mean (mean abs)",
        "volume error cm3 mean",
        "missed / false alarm",
    )
    rows = []
    for s in r["labels"]:
        d, h, p, a, c = (
            s["dice"],
            s["hd95_mm"],
            s["volume_error_pct"],
            s["abs_volume_error_pct"],
            s["volume_error_cm3"],
        )
        hd = f"{_f(h['mean'], 1)} / {_f(h['median'], 1)} / {_f(h['max'], 1)}"
        if h["n_undefined"]:
            hd += f" ({h['n_undefined']} undefined)"
        rows.append(
            (
                f"{s['label']} ({s['label_value']})",
                str(s["n_cases"]),
                f"{_f(d['mean'])} / {_f(d['median'])} / {_f(d['min'])}",
                hd,
                f"{_f(p['mean'], 1)} ({_f(a['mean'], 1)})",
                _f(c["mean"], 1),
                f"{s['n_missed']} / {s['n_false_alarm']}",
            )
        )
    return Block("table", rows, header)


def _classification_summary(r: dict[str, Any]) -> Block:
    header = (
        "finding",
        "n (pos / neg)",
        "threshold",
        "accuracy",
        "precision",
        "recall (sensitivity)",
        "specificity",
        "AUC",
    )
    rows = [
        (
            f["finding"],
            f"{f['n']} ({f['n_positive']} / {f['n_negative']})",
            _f(f["threshold"], 2),
            _ci(f["accuracy"]),
            _ci(f["precision"]),
            _ci(f["recall"]),
            _ci(f["specificity"]),
            _ci(f["auc"]),
        )
        for f in r["findings"]
    ]
    return Block("table", rows, header)


def _case_table(r: dict[str, Any]) -> Block:
    if r["task"] == "segmentation":
        header: Row = (
            "case",
            "series UID",
            "label",
            "Dice",
            "HD95 mm",
            "reference cm3",
            "model cm3",
            "error cm3",
            "error %",
            "inference s",
            "notes",
        )
        rows = [
            (
                c["case"],
                c.get("series_uid") or "-",
                s["label"],
                _f(s["dice"]),
                _f(s["hd95_mm"], 1),
                _f(s["reference_cm3"], 1),
                _f(s["prediction_cm3"], 1),
                _f(s["volume_error_cm3"], 1),
                _f(s["volume_error_pct"], 1),
                _f(c["timing_s"].get("inference"), 2),
                "; ".join(c.get("notes", [])),
            )
            for c in r["cases"]
            if c["status"] == "ok"
            for s in c["labels"]
        ]
        return Block("table", rows, header)
    header2: Row = ("case", "series UID", "finding", "probability", "model says", "reference", "inference s")
    rows2: list[Row] = [
        (
            c["case"],
            c.get("series_uid") or "-",
            f["finding"],
            _f(f["probability"]),
            "present" if f["predicted"] else "absent",
            "-" if f["truth"] is None else str(f["truth"]),
            _f(c["timing_s"].get("inference"), 2),
        )
        for c in r["cases"]
        if c["status"] == "ok"
        for f in c["findings"]
    ]
    return Block("table", rows2, header2)


def _model_rows(model: dict[str, Any]) -> list[Row]:
    rows: list[Row] = [
        ("name", model["name"]),
        ("version", model["version"]),
        ("description", model["description"] or "-"),
    ]
    if not model.get("manifest"):
        return [*rows, ("manifest", "none registered: licence, intended use and weights unknown")]
    weights = (
        "; ".join(
            f"{w['file']} sha256 {w['sha256']} ({'verified' if w['verified'] else 'NOT verified: ' + w.get('problem', 'mismatch')})"
            for w in model["weights"]
        )
        or "none (no learned weights)"
    )
    return [
        *rows,
        ("format", model["format"]),
        ("weights", weights),
        ("licence", model["licence"]),
        ("intended use", model["intended_use"]),
        ("training data", model["training_data"]),
        ("accepts", ", ".join(model["accepts_modalities"])),
    ]


def _definitions(task: str) -> list[str]:
    if task == "segmentation":
        return [
            "Dice: 2|model AND reference| / (|model| + |reference|), 0 (no overlap) to 1 (identical); 1 when both are empty.",
            "HD95 (mm): the 95th percentile of distances between the two surfaces (the larger of both directions), "
            "in mm with the true voxel spacing; 0 is perfect. Undefined when one mask is empty.",
            "Volume error: model minus reference volume (cm3), and that as % of the reference; positive = too large.",
            "Missed: reference has the structure, model found none. False alarm: the reverse.",
        ]
    return [
        "Accuracy: share of cases called right at the model's threshold. Precision (PPV): share of positive calls that are right.",
        "Recall (sensitivity): share of positive cases called positive. Specificity: share of negative cases called negative.",
        "AUC: probability that a random positive case scores above a random negative one (ties count half); 0.5 is chance.",
        "[a, b]: 95% interval. A rate with nothing to divide by is n/a.",
    ]


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(rate: dict[str, Any]) -> str:
    if rate["value"] is None:
        return "n/a"
    return (
        f"{rate['value']:.3f} [{rate['ci95'][0]:.2f}, {rate['ci95'][1]:.2f}]"
        if rate["ci95"]
        else f"{rate['value']:.3f}"
    )
