"""Local validation of a model before go-live: `dicom-ai-node evaluate MODEL DATASET`.

dataset.py reads the dataset layouts, reference.py maps reference segmentations onto the source grid,
metrics.py scores, run.py runs the model case by case, report.py/plots.py write JSON, Markdown, HTML
and PNGs. docs/evaluation.md is the user's guide.
"""

from dicom_ai_node.evaluate.reference import DatasetError
from dicom_ai_node.evaluate.run import evaluate

__all__ = ["DatasetError", "evaluate"]
