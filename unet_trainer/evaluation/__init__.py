"""Scoring and looking at predictions: sliding-window inference, Dice/HD95 and lesion-wise metrics,
the validation evaluator, postprocessing choice, overlays and curves.

May import from core, data and models.
"""
