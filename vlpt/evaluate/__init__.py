"""Evaluators: pure functions over embeddings / similarity matrices that return flat metric dicts."""

from vlpt.evaluate.linear_probe import linear_probe
from vlpt.evaluate.report import write_metrics, write_report
from vlpt.evaluate.retrieval import (
    retrieval_metrics,
    retrieval_ranks,
    text_to_image_examples,
)
from vlpt.evaluate.zero_shot import (
    COLOR_CLASS_NAMES,
    SHAPE_CLASS_NAMES,
    SHAPES_TEMPLATES,
    accuracy,
    build_prompt_classifier,
    build_zero_shot_classifier,
    confusion_matrix,
    format_prompt,
    zero_shot_logits,
)

__all__ = [
    "COLOR_CLASS_NAMES",
    "SHAPES_TEMPLATES",
    "SHAPE_CLASS_NAMES",
    "accuracy",
    "build_prompt_classifier",
    "build_zero_shot_classifier",
    "confusion_matrix",
    "format_prompt",
    "linear_probe",
    "retrieval_metrics",
    "retrieval_ranks",
    "text_to_image_examples",
    "write_metrics",
    "write_report",
    "zero_shot_logits",
]
