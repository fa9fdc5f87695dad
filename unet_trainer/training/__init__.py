"""The training loop and what hangs on it: engine and events (trainer), batches moved to the device
(prefetch, a leaf), losses, optimizers, schedules, batched augmentation (augment, with the transforms
in spatial and intensity on the base batch_transform), algorithms, callbacks, loggers and reporting.

May import from core, data, models and evaluation.
"""
