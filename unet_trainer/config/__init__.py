"""Configs: the project's config (config: its tree of sections and defaults, its cross-key rules, and
resolving the layers), the generic engine that checks, merges and overrides them (engine), and the
named components a config may choose (components: models, optimizers, schedulers, losses, callbacks,
logger destinations, algorithms).

May import from core, data, models, evaluation and training.
"""
