"""``psr-eval`` and its suites: sampling and scoring (:mod:`psr.evaluate.runner`), the scores file and
its summary (:mod:`psr.evaluate.scores`), the suites (:mod:`psr.evaluate.psrbench`,
:mod:`psr.evaluate.dreambench`, :mod:`psr.evaluate.omnicontext`, :mod:`psr.evaluate.omniref`) and the
report over runs (:mod:`psr.evaluate.report`, ``psr-report``)."""

from psr.evaluate.runner import (
    GRID,
    SCORES,
    SETTINGS,
    SUMMARY,
    Evaluator,
    SuiteScorer,
    image_name,
    main,
    quantize,
    sample_seed,
    to_pil,
)
from psr.evaluate.scores import json_value, print_summary, read_scores, summarize

__all__ = [
    "GRID",
    "SCORES",
    "SETTINGS",
    "SUMMARY",
    "Evaluator",
    "SuiteScorer",
    "image_name",
    "json_value",
    "main",
    "print_summary",
    "quantize",
    "read_scores",
    "sample_seed",
    "summarize",
    "to_pil",
]
