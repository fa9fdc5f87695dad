"""unet-trainer: Composer-style training recipes for 3D brain-tumour segmentation.

Modules, one per concern:
    config        YAML configs, recipes, command-line overrides, durations
    data/         dataset layouts (data/layouts/, one module per layout), the synthetic phantom,
                  preparation, splits, patch loader
    transforms    batched augmentation run on the training device
    model         the nnU-Net-style U-Net family
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
