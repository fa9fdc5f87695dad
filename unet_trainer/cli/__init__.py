"""The command lines: one module per command (train, data, evaluate, predict, cv; each with its ``main(argv)``,
a console script of pyproject.toml), their argparse parsing (parsing) and their one-line errors and exit codes
(errors); ``python -m unet_trainer.cli COMMAND ...`` (__main__).

May import from every stage.
"""
