"""``python -m unet_trainer.cli train|data|eval|predict|cv ...`` (handy under torchrun)."""

from __future__ import annotations

import sys

from . import cv, data, evaluate, predict, train

# The command names, each with its console script's main (see [project.scripts] in pyproject.toml).
COMMANDS = {"train": train.main, "data": data.main, "eval": evaluate.main, "predict": predict.main, "cv": cv.main}


def main(argv: list[str] | None = None) -> int:
    """Run the command named by the first argument on the rest; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m unet_trainer.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
