"""Local validation of a model before go-live: `dicom-ai-node evaluate MODEL DATASET`.

dataset.py reads the dataset layouts, reference.py maps reference segmentations onto the source grid,
metrics.py scores, run.py runs the model case by case, report.py/plots.py write JSON, Markdown, HTML
and PNGs. docs/evaluation.md is the user's guide.

The package's own __init__ imports nothing: the CLI registers `evaluate` at every start, and scipy,
highdicom and matplotlib (3 s here) load only when an evaluation runs.
"""
