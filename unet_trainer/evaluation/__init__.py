"""Scoring and looking at predictions: sliding-window inference (``SlidingWindow``), Dice/HD95 and
lesion-wise metrics, the registry of the evaluator's per-case metrics (``case_metrics.METRICS``),
the validation evaluator and its per-case table (``cases``, a leaf), postprocessing choice,
overlays and curves.

May import from core, data and models.
"""
