"""unet-trainer: Composer-style training recipes for 3D brain-tumour segmentation.

Five commands: unet-train (train or resume a run), unet-data (prepare a dataset, write the phantom),
unet-eval (score a checkpoint), unet-predict (segment raw cases) and unet-cv (cross-validation).

The package is built in stages, one folder each; a module imports only from its own stage and
from the stages listed before it (tests/test_architecture.py checks it):
    core/         atomic file I/O, distributed helpers, durations, typed settings, document reading,
                  the output guard, run folders and their locks, checkpoint files
    data/         dataset layouts (data/layouts/, one module per layout), the synthetic phantom,
                  preparation, splits, the patch loader
    models/       the nnU-Net-style U-Net family (model) and the residual-encoder U-Net (resenc)
    evaluation/   sliding-window inference, Dice/HD95 and lesion-wise metrics, the evaluator,
                  postprocessing, overlays and curves
    training/     events, state and the training loop (trainer), losses, optimizers, schedules,
                  batched augmentation (transforms), algorithms, callbacks, loggers, reporting
    config/       YAML configs, recipes and overrides (config); the named components (components)
    commands/     what the commands do: builders, resume and train (the only places that read a config
                  and build objects), folders and loading (a run's checkpoint, its model or an
                  ensemble's), predict, cv
    cli/          the command lines (main); ``python -m unet_trainer.cli COMMAND ...``
"""

__version__ = "0.1.0"
