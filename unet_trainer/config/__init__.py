"""Configs: YAML recipes, overrides and their validation (config), and the named components a config
may choose (components: models, optimizers, losses, callbacks, algorithms, loggers).

May import from core, data, models, evaluation and training.
"""
