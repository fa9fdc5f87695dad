"""``python -m unet_trainer.cli train|data|eval|predict|cv ...`` (handy under torchrun)."""

import sys

from .main import main

sys.exit(main())
