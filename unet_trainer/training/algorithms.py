"""Algorithms: changes to the computation that hook onto events, switched on by name in YAML
(``algorithms: {channels_last: {}, ema: {decay: 0.999}}``). They run before callbacks at each event.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core.schema import Probability
from ..models.base import optimize_model
from .trainer import Algorithm, Event, State


class ChannelsLast(Algorithm):
    """Channels-last memory format for the model (at init) and for every batch (at batch start).

    On GPUs, convolutions in channels-last layout map onto tensor-core kernels without transposes.
    """

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BATCH_START)

    def apply(self, event: Event, state: State) -> None:
        if event == Event.INIT:
            optimize_model(state.unwrapped_model, channels_last=True)
            return
        if state.batch is not None:
            image, label = state.batch
            fmt = torch.channels_last_3d if image.ndim == 5 else torch.channels_last
            state.batch = (image.contiguous(memory_format=fmt), label)


class EMA(Algorithm):
    """Exponential moving average of the weights: ``ema = decay * ema + (1 - decay) * weights``.

    Updated after every optimizer step; evaluation (and so the best checkpoint's score) uses the
    averaged weights, swapped in at eval start and out at eval end, so training itself is
    unchanged. The average lives in ``state.extra_state["ema"]`` and is saved in checkpoints, so
    it resumes exactly. Buffers (e.g. batch-norm statistics) are copied, not averaged.
    """

    def __init__(self, decay: Probability = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self._backup: dict[str, torch.Tensor] | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BATCH_END, Event.EVAL_START, Event.EVAL_END)

    @torch.no_grad()
    def apply(self, event: Event, state: State) -> None:
        model_state = state.unwrapped_model.state_dict()
        if event == Event.INIT:
            saved = state.extra_state.get("ema")
            if saved is None or saved.keys() != model_state.keys():
                state.extra_state["ema"] = {k: v.detach().clone() for k, v in model_state.items()}
            else:  # resumed: bring the saved average onto the model's device
                state.extra_state["ema"] = {k: v.to(model_state[k].device) for k, v in saved.items()}
        elif event == Event.BATCH_END:
            average = state.extra_state["ema"]
            floating = [k for k, v in model_state.items() if v.is_floating_point()]
            torch._foreach_lerp_([average[k] for k in floating], [model_state[k] for k in floating], 1.0 - self.decay)
            for key, value in model_state.items():
                if not value.is_floating_point():
                    average[key].copy_(value)
        elif event == Event.EVAL_START:
            self._backup = {k: v.detach().clone() for k, v in model_state.items()}
            state.unwrapped_model.load_state_dict(state.extra_state["ema"])
        elif event == Event.EVAL_END and self._backup is not None:
            state.unwrapped_model.load_state_dict(self._backup)
            self._backup = None


class Compile(Algorithm):
    """``torch.compile`` the model's forward in place at init (``nn.Module.compile``), so the
    module, its state-dict keys and a DDP wrapper around it stay as they are."""

    def __init__(self, mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"):
        self.mode = mode

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State) -> None:
        state.unwrapped_model.compile(mode=self.mode)


class CudnnBenchmark(Algorithm):
    """Turn on ``torch.backends.cudnn.benchmark`` at init: fixed patch sizes make the one-off
    autotuning per shape pay for itself within a few steps. The flag is process-wide, so the
    previous value is put back at fit end (code that runs after training in the same process, a
    notebook say, keeps its own cuDNN choice)."""

    def __init__(self) -> None:
        self._previous: bool | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_END)

    def apply(self, event: Event, state: State) -> None:
        if event == Event.INIT:
            self._previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
        elif self._previous is not None:
            torch.backends.cudnn.benchmark = self._previous
            self._previous = None
