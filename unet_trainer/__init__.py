"""unet-trainer: Composer-style training recipes for 3D brain-tumour segmentation.

Modules, one per concern:
    config        YAML configs, recipes, command-line overrides
    duration      training durations (200ep, 1000ba, 64sp)
    schema        config settings derived from a component's typed signature
    components    the named models, optimizers, losses, callbacks and algorithms
    data/         dataset layouts (data/layouts/, one module per layout), the synthetic phantom,
                  preparation, splits, patch loader
    transforms    batched augmentation run on the training device
    model         the nnU-Net-style U-Net family, and what every model shares
    resenc        nnU-Net's residual-encoder U-Net (ResEnc)
    optimizers    the optimizers, with our defaults
    losses        Dice+CE and region losses
    metrics       Dice per label and per BraTS region
    inference     sliding-window prediction
    trainer       events, state and the training loop
    callbacks     side effects hung on events (logging, checkpoints, progress)
    checkpoint    atomic save, load and RNG capture
    distributed   torchrun/DDP helpers
    builders      the only place that reads the config and builds objects
    cli           the unet-train and unet-data commands
"""

__version__ = "0.1.0"
