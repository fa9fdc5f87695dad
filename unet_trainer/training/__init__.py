"""The training loop and what hangs on it: engine and events (trainer), losses, optimizers,
schedules, batched augmentation (transforms), algorithms, callbacks, loggers and reporting.

May import from core, data, models and evaluation.
"""
