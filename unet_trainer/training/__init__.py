"""The training loop and what hangs on it: engine and events (trainer), losses, optimizers,
schedules, batched augmentation (augment, with the
transforms in spatial and intensity on the base batch_transform), algorithms, callbacks, loggers and reporting.

May import from core, data, models and evaluation.
"""
