"""The optimizers a config can choose, one typed function each: its keyword arguments are the
settings (the config schema is derived from them with :func:`unet_trainer.core.schema.fields_of`) and
its defaults are ours. ``radam`` carries Composer's UNet card (lr 1e-3, betas (0.9, 0.999),
eps 1e-8); ``sgd`` nnU-Net's (lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5).

Each takes the parameters first and returns the torch optimizer; the names are registered in
:data:`unet_trainer.config.components.OPTIMIZERS`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..core.schema import NonNegative

Betas = tuple[float, float]
Parameters = Iterable[torch.nn.Parameter] | Iterable[dict]


def radam(
    params: Parameters,
    lr: NonNegative = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: NonNegative = 1e-8,
    weight_decay: NonNegative = 0.0,
) -> torch.optim.Optimizer:
    """``torch.optim.RAdam`` (Composer's UNet card optimizer)."""
    return torch.optim.RAdam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def adam(
    params: Parameters,
    lr: NonNegative = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: NonNegative = 1e-8,
    weight_decay: NonNegative = 0.0,
) -> torch.optim.Optimizer:
    """``torch.optim.Adam``."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def adamw(
    params: Parameters,
    lr: NonNegative = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: NonNegative = 1e-8,
    weight_decay: NonNegative = 1e-2,
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def sgd(
    params: Parameters,
    lr: NonNegative = 1e-2,
    momentum: NonNegative = 0.99,
    nesterov: bool = True,
    weight_decay: NonNegative = 3e-5,
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` with nnU-Net's defaults."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
