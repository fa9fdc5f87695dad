"""The model of a checkpoint: :func:`load_model` rebuilds it from the config stored in the
checkpoint (with command-line overrides such as ``eval.mirror_tta=true device=cpu precision=fp32``),
as a :class:`LoadedModel` ready for inference. What ``unet-eval``, ``unet-predict`` (:mod:`predict`)
and their ensembles (:mod:`ensemble`) load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.components import output_mode
from ..config.config import resolve_from_base
from ..config.engine import ConfigError
from ..core.checkpoint import CheckpointError, load_checkpoint, one_line
from ..evaluation.evaluation import logits_to_probabilities
from ..evaluation.inference import SlidingWindow
from ..models.base import SegmentationModel, optimize_model
from ..training.losses import OutputMode
from .builders import build_device, build_model, build_sliding_window


@dataclass
class LoadedModel:
    """A checkpoint's model, ready for inference.

    Attributes:
        model: in eval mode on ``device``; its ``spatial_dims``, ``num_classes`` and ``in_channels``
            are what the properties below report.
        cfg: the checkpoint's resolved config with the overrides applied.
        device: where the model and every tensor of its inference live.
        sliding_window: its inference over a volume, from the config's patch, ``eval`` settings and
            precision (:func:`~unet_trainer.commands.builders.build_sliding_window`).
        region_mode: outputs are sigmoid (WT, TC, ET) regions (the loss's ``output_mode``).
        checkpoint: the checkpoint file (symlinks resolved).
        weights: "ema" when the checkpoint's moving-average weights were loaded (the weights its
            own evaluations used), else "model".
        timestamp: the checkpoint's progress counters (``epoch``, ``batch``...), empty if it has none.
    """

    model: SegmentationModel
    cfg: dict
    device: torch.device
    sliding_window: SlidingWindow
    region_mode: bool
    checkpoint: Path
    weights: str
    timestamp: dict = field(default_factory=dict)

    @property
    def checkpoints(self) -> list[Path]:
        """[the checkpoint], as an ensemble lists its members'."""
        return [self.checkpoint]

    @property
    def spatial_dims(self) -> int:
        return self.model.spatial_dims

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.sliding_window.patch_size

    @property
    def num_outputs(self) -> int:
        return self.model.num_classes

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits of a prepared volume with the config's ``eval`` settings.

        Args:
            image: float32 (C, Z, Y, X) on ``device``.

        Returns:
            float32 (K, Z, Y, X) on ``device``.
        """
        return self.sliding_window(self.model, image)

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` as probabilities: float32 (K, Z, Y, X) softmax classes, or sigmoid
        regions in region mode, on ``device`` (what :class:`~unet_trainer.commands.ensemble.EnsembleModel`
        averages)."""
        return logits_to_probabilities(self.logits(image), self.region_mode)


def load_model(checkpoint: Path, overrides: Sequence[str] = (), channels_last: bool | None = None) -> LoadedModel:
    """Rebuild a checkpoint's model from the config stored in it.

    Args:
        checkpoint: a ``.pt`` checkpoint of ``unet-train`` (a ``latest``/``best`` symlink is fine).
        overrides: ``key=value`` / ``--key value`` overrides on top of the stored config.
        channels_last: run the model in channels-last memory format (the layout tensor-core
            convolutions use natively); None = on CUDA only.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        CheckpointError: unreadable file, no config in it, or weights that do not fit its model.
        ConfigError: a bad override, a stored config this version cannot read, or device=cuda
            without a GPU.
    """
    path = Path(checkpoint).expanduser()
    state = load_checkpoint(path)
    base = state.get("config")
    if not isinstance(base, dict) or "model" not in base:
        raise CheckpointError(f"{path}: holds no training config, so its model cannot be rebuilt")
    cfg = resolve_from_base(base, list(overrides), source=f"{path} (stored config)")
    device = build_device(cfg["device"])
    try:
        model = build_model(cfg["model"])
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    ema = (state.get("extra_state") or {}).get("ema")
    weights, name = (ema, "ema") if isinstance(ema, dict) and ema else (state["model"], "model")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        reason = one_line(str(exc)) if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: the {name} weights do not fit the model of its config ({reason})") from None
    model.to(device).eval()
    if channels_last if channels_last is not None else device.type == "cuda":
        optimize_model(model, channels_last=True)
    return LoadedModel(
        model=model,
        cfg=cfg,
        device=device,
        sliding_window=build_sliding_window(cfg),
        region_mode=output_mode(cfg["loss"]) is OutputMode.REGIONS,
        checkpoint=path.resolve(),
        weights=name,
        timestamp=dict(state.get("timestamp") or {}),
    )
