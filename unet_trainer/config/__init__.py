"""Configs: resolving the layers (config), the generic engine that checks, merges and overrides them
(engine), the project's tree of sections and defaults (tree), the cross-key rules (rules), and the
named components a config may choose (components: models, optimizers, schedulers, losses,
callbacks, logger destinations, algorithms).

May import from core, data, models, evaluation and training.
"""
