"""The command lines (main): argument parsing, one-line errors and exit codes for unet-train,
unet-data, unet-eval, unet-predict and unet-cv; ``python -m unet_trainer.cli COMMAND ...``.

May import from every stage.
"""
