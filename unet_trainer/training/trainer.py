"""The training loop, Composer-style: a State, Events, and hooks that run on them.

The loop in :func:`fit` reads top to bottom. Everything that is not the optimisation itself hangs
on events: algorithms (speed-ups that change the computation) run first at each event, then
callbacks (side effects: progress, logs, checkpoints, early stop). Neither is special-cased in
the loop.

Timekeeping follows Composer: ``timestamp.batch`` counts optimizer steps, ``timestamp.sample``
samples (global, across ranks), ``timestamp.epoch`` finished epochs. The data position is
(epoch, batch_in_epoch): the sampler is a pure function of it, so a resumed run sees exactly the
batches an uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.distributed import all_ranks_agree, average_gradients, smallest_on_any_rank
from ..core.schema import Duration
from .prefetch import DevicePrefetcher


class Event(str, Enum):
    """Points in the run where algorithms and callbacks are called, in the order they occur."""

    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_FORWARD = "after_forward"
    AFTER_LOSS = "after_loss"
    AFTER_BACKWARD = "after_backward"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stops without stepping, keeping the last good checkpoint."""


@dataclass
class Timestamp:
    """Progress counters; all saved in checkpoints."""

    epoch: int = 0  # finished epochs
    batch: int = 0  # optimizer steps taken
    sample: int = 0  # training samples consumed, all ranks
    batch_in_epoch: int = 0  # steps taken in the current epoch
    sample_in_epoch: int = 0  # samples consumed in the current epoch, all ranks

    def reached(self, duration: Duration, batches_per_epoch: int, samples_per_epoch: int) -> bool:
        """Whether this point is at or past ``duration``."""
        if duration.unit == "ep":
            return self.epoch >= duration.value
        if duration.unit == "ba":
            return self.batch >= duration.value
        return self.sample >= duration.value


def duration_in_batches(duration: Duration, batches_per_epoch: int, batch_size: int) -> int:
    """Convert a duration to optimizer steps (samples round up to whole batches)."""
    if duration.unit == "ep":
        return duration.value * batches_per_epoch
    if duration.unit == "ba":
        return duration.value
    return math.ceil(duration.value / batch_size)


@dataclass
class State:
    """Everything the loop and its hooks share. Built by :mod:`unet_trainer.commands.builders`."""

    model: nn.Module  # the module stepped (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # schedules.BatchScheduler
    loss_fn: nn.Module
    train_loader: Any  # DataLoader with an EpochSampler
    device: torch.device
    max_duration: Duration
    train_batch_size: int  # global batch
    batches_per_epoch: int
    samples_per_epoch: int
    amp_dtype: torch.dtype | None = None
    scaler: Any = None  # torch.amp.GradScaler for fp16
    augmenter: Callable | None = None  # transforms.BatchAugmenter
    microbatch_size: int | str | None = None  # int, "auto" or None (whole rank batch)
    grad_clip_norm: float | None = None
    prefetch_to_device: bool = True  # copy the next batch on a side CUDA stream
    evaluator: Callable[[State], dict] | None = None
    eval_interval: Duration | None = None
    run_dir: Path | None = None
    config: dict = field(default_factory=dict)
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    run_id: str = ""  # the run's identity, saved in its checkpoints
    timestamp: Timestamp = field(default_factory=Timestamp)
    eval_history: list = field(default_factory=list)  # one record per evaluation
    # Per batch, for hooks to read or change.
    batch: tuple | None = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    step_metrics: dict = field(default_factory=dict)
    last_batch_samples: int = 0  # global samples in the step just taken
    stop_reason: str | None = None
    extra_state: dict = field(default_factory=dict)  # hooks' own resumable state, by name
    # Under DDP, whether the ranks have agreed on the "auto" microbatch in this process (not saved:
    # a resumed run, maybe on other GPUs, checks its saved size again).
    auto_microbatch_agreed: bool = False

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def total_batches(self) -> int:
        return duration_in_batches(self.max_duration, self.batches_per_epoch, self.train_batch_size)

    @property
    def finished_epochs(self) -> int:
        """Epochs finished by the steps taken so far; an epoch counts as finished as soon as its
        last batch is done (also in the hooks of that batch, before the loop moves to the next
        epoch). The one meaning of "epoch" in eval_metrics.csv, train_metrics.csv, checkpoint
        names (``ep{E}-ba{B}``) and the console, whatever the interval units."""
        ts = self.timestamp
        return ts.epoch + (1 if ts.batch_in_epoch >= self.batches_per_epoch else 0)

    def done(self) -> bool:
        return self.timestamp.reached(self.max_duration, self.batches_per_epoch, self.samples_per_epoch)

    def state_dict(self) -> dict:
        """What a checkpoint holds besides the RNG states (weights-only loadable)."""
        return {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "augmenter": self.augmenter.state_dict() if self.augmenter is not None else None,
            "timestamp": asdict(self.timestamp),
            "eval_history": self.eval_history,
            "config": self.config,
            "extra_state": self.extra_state,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        self.unwrapped_model.load_state_dict(state["model"])
        if weights_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        augmenter_state = rank_entry(state, "augmenter", self.rank, self.world_size)
        if self.augmenter is not None and augmenter_state is not None:
            self.augmenter.load_state_dict(augmenter_state)
        self.timestamp = Timestamp(**state["timestamp"])
        self.eval_history = list(state.get("eval_history", []))
        self.extra_state = dict(state.get("extra_state", {}))


def rank_entry(checkpoint: dict, key: str, rank: int, world_size: int):
    """This rank's copy of a per-rank value (``{key}_per_rank``) when the checkpoint was written by
    the same number of ranks, else the single ``key`` value (rank 0's)."""
    per_rank = checkpoint.get(f"{key}_per_rank")
    if isinstance(per_rank, list) and len(per_rank) == world_size:
        return per_rank[rank]
    return checkpoint.get(key)


class Callback:
    """A side effect on events: override the methods named after the events you need (each gets
    the :class:`State`); the others stay no-ops. The Engine calls :meth:`run_event`, which routes
    each event to its method, so a callback may also override :meth:`run_event` to see them all.

    ``after_forward``, ``after_loss`` and ``after_backward`` fire once per microbatch: more than
    once a step with ``device_train_microbatch_size``, and again when the "auto" search retries a
    batch after running out of memory. Algorithms run before callbacks at every event.

    Class attributes (read by the builder of a configured callback):
        writer_only: built on the writing rank (rank 0) only, e.g. one that only draws a file.
        needs_evaluator: built only when the run evaluates (it has validation cases).
    """

    writer_only: ClassVar[bool] = False
    needs_evaluator: ClassVar[bool] = False

    def run_event(self, event: Event, state: State) -> None:
        """Call the method named after ``event`` (``Event.EPOCH_END`` -> :meth:`epoch_end`)."""
        getattr(self, event.value)(state)

    def init(self, state: State) -> None:
        """Once, after the State is built (a resume's checkpoint loaded) and before DDP wraps the model."""

    def fit_start(self, state: State) -> None:
        """Once, when fit begins: ``timestamp`` is where the run starts (a resume's step), nothing logged yet."""

    def epoch_start(self, state: State) -> None:
        """At each epoch's start (a resumed one too): ``timestamp.epoch`` counts the finished epochs."""

    def batch_start(self, state: State) -> None:
        """Before each step: ``state.batch`` is the (image, label) batch, on the device and augmented."""

    def after_forward(self, state: State) -> None:
        """After each microbatch's forward, inside autocast: ``state.outputs`` holds its outputs."""

    def after_loss(self, state: State) -> None:
        """After each microbatch's loss: ``state.loss`` is its mean loss, before the backward."""

    def after_backward(self, state: State) -> None:
        """After each microbatch's backward: its gradients are added into the parameters' ``.grad``."""

    def batch_end(self, state: State) -> None:
        """After the optimizer step, the counters moved on and any evaluation due: ``step_metrics`` is the step's."""

    def epoch_end(self, state: State) -> None:
        """After an epoch's last batch (and its evaluation, if due): ``timestamp.epoch`` counts it."""

    def eval_start(self, state: State) -> None:
        """Before each evaluation (EMA's weights already swapped in); the model is still in training mode."""

    def eval_end(self, state: State) -> None:
        """After each evaluation: ``state.eval_history[-1]`` is its record, the model back in training mode."""

    def fit_end(self, state: State) -> None:
        """Once, after the last step and the final evaluation (not when training raised)."""


class Algorithm:
    """A change to the computation, applied at the events it matches (runs before callbacks)."""

    def match(self, event: Event, state: State) -> bool:
        raise NotImplementedError

    def apply(self, event: Event, state: State) -> None:
        raise NotImplementedError


class Engine:
    """Runs algorithms, then callbacks, at each event."""

    def __init__(self, state: State, algorithms: Sequence[Algorithm] = (), callbacks: Sequence[Callback] = ()):
        self.state = state
        self.algorithms = list(algorithms)
        self.callbacks = list(callbacks)

    def run(self, event: Event) -> None:
        for algorithm in self.algorithms:
            if algorithm.match(event, self.state):
                algorithm.apply(event, self.state)
        for callback in self.callbacks:
            callback.run_event(event, self.state)


def _autocast(state: State):
    if state.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=state.device.type, dtype=state.amp_dtype)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _microbatches(size: int, microbatch: int | str | None) -> list[tuple[int, int]]:
    if not isinstance(microbatch, int) or microbatch >= size:
        return [(0, size)]
    return [(start, min(start + microbatch, size)) for start in range(0, size, microbatch)]


def _accumulate_gradients(state: State, engine: Engine, model: nn.Module, micro: int | None) -> torch.Tensor:
    """Forward and backward ``state.batch`` in microbatches of ``micro`` samples through ``model``,
    each loss scaled by its share of the batch, so the gradients add up to the whole batch's.
    Under DDP only the last microbatch's backward all-reduces. Returns the batch's mean loss as a
    0-d tensor on the device (not read here: reading it would stall the host on the GPU)."""
    image, label = state.batch
    size = image.shape[0]
    total = torch.zeros((), device=state.device)
    chunks = _microbatches(size, micro)
    for index, (lo, hi) in enumerate(chunks):
        sync = nullcontext()
        if hasattr(model, "no_sync") and index < len(chunks) - 1:
            sync = model.no_sync()
        with sync:
            with _autocast(state):
                state.outputs = model(image[lo:hi])
                engine.run(Event.AFTER_FORWARD)
                state.loss = state.loss_fn(state.outputs, label[lo:hi])
            engine.run(Event.AFTER_LOSS)
            scaled = state.loss * ((hi - lo) / size)
            if state.scaler is not None:
                state.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            engine.run(Event.AFTER_BACKWARD)
            total += scaled.detach().float()
    return total


def train_batch(state: State, engine: Engine) -> float:
    """One optimizer step over ``state.batch`` (already on the device and augmented).

    The rank's batch is split into microbatches whose gradients accumulate, each loss scaled by
    its share of the batch, so the step matches the whole batch. With ``microbatch_size="auto"``
    an out-of-memory error halves the microbatch and the same batch is retried
    (:func:`accumulate_with_auto_microbatch`).

    Returns:
        The batch's mean loss as a float.

    Raises:
        TrainingDiverged: the loss is NaN or Inf (the optimizer has not stepped).
        torch.cuda.OutOfMemoryError: out of memory with a fixed microbatch, at microbatch 1, or
            under DDP after the ranks agreed on the microbatch (no rank can retry alone then).
    """
    if state.microbatch_size == "auto":
        total = accumulate_with_auto_microbatch(state, engine)
    else:
        state.optimizer.zero_grad(set_to_none=True)
        total = _accumulate_gradients(state, engine, state.model, state.microbatch_size)
    loss_value = finite_loss(state, total)
    optimizer_step(state)
    state.outputs = None
    return loss_value


def accumulate_with_auto_microbatch(state: State, engine: Engine) -> torch.Tensor:
    """Accumulate ``state.batch``'s gradients at the largest microbatch that fits: start from the
    saved size (``extra_state["auto_microbatch"]``, first the whole rank batch) and halve it and
    retry the same batch on every out-of-memory error, keeping the size that worked for later steps.

    Under DDP the ranks must take the same steps: until they have agreed on the microbatch, a step
    runs through the plain module (no DDP hooks, so an out-of-memory error leaves no all-reduce
    half done), the ranks then agree whether every one of them succeeded, halving together from
    the smallest size tried if not, and the gradients are averaged by hand as DDP would. From then
    on steps run through DDP as usual.

    Returns:
        The batch's mean loss as a 0-d tensor on the device (see :func:`_accumulate_gradients`).

    Raises:
        torch.cuda.OutOfMemoryError: out of memory at microbatch 1, or under DDP after the ranks
            agreed on the microbatch.
    """
    state.extra_state.setdefault("auto_microbatch", state.batch[0].shape[0])
    searching = state.world_size > 1 and not state.auto_microbatch_agreed
    model = state.unwrapped_model if searching else state.model
    while True:
        micro = state.extra_state["auto_microbatch"]
        state.optimizer.zero_grad(set_to_none=True)
        failed = False
        try:
            total = _accumulate_gradients(state, engine, model, micro)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_out_of_memory(exc) or micro <= 1:
                raise
            if state.world_size > 1 and not searching:
                raise torch.cuda.OutOfMemoryError(
                    f"out of memory at device_train_microbatch_size {micro}, which the ranks had agreed on; "
                    "under DDP one rank cannot retry alone: set device_train_microbatch_size to a smaller "
                    "number"
                ) from exc
            # Drop every reference to the failed attempt's autograd graph: after an OOM in backward,
            # the loss still reaches the nodes that did not run, with their saved activations, and
            # the retry would otherwise run out of memory again with them allocated.
            state.outputs = state.loss = None
            failed = True
        if searching:
            if all_ranks_agree(not failed, state.device):
                average_gradients(state.unwrapped_model, state.world_size)
                state.auto_microbatch_agreed = True
                return total
            micro = smallest_on_any_rank(micro, state.device)
        elif not failed:
            return total
        state.optimizer.zero_grad(set_to_none=True)
        state.extra_state["auto_microbatch"] = max(1, micro // 2)
        # Outside the except block the traceback, and with it the frames of the failed
        # forward/backward, is gone, so their tensors are back in the caching allocator and
        # empty_cache can release them.
        if state.device.type == "cuda":
            torch.cuda.empty_cache()


def finite_loss(state: State, total: torch.Tensor) -> float:
    """The batch's loss on the host (the step's one host sync).

    Raises:
        TrainingDiverged: it is NaN or Inf, on this rank or any other (every rank stops at the same
            step); the gradients are cleared first, so the optimizer never steps on them.
    """
    loss_value = total.item()
    finite = math.isfinite(loss_value)
    if state.world_size > 1:
        finite = all_ranks_agree(finite, state.device)
    if not finite:
        state.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"loss became {loss_value} at batch {state.timestamp.batch + 1} (epoch {state.timestamp.epoch + 1}); "
            "stopped before the optimizer step, the last checkpoint is the last good state"
        )
    return loss_value


def optimizer_step(state: State) -> None:
    """Step on the accumulated gradients: clip them to ``grad_clip_norm`` (unscaled first under
    fp16), step the optimizer (through the gradient scaler under fp16, which skips a step with
    Inf/NaN gradients and updates its scale), then the learning-rate schedule."""
    if state.grad_clip_norm is not None:
        if state.scaler is not None:
            state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.grad_clip_norm)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()


def interval_due(interval: Duration | None, state: State, at_epoch_end: bool) -> bool:
    """Whether an every-``interval`` action (evaluate, save) is due at this point.

    Epoch intervals fall due at epoch ends; batch and sample intervals at batch ends, when the
    step just taken reached or crossed a multiple of the interval (the last batch of an epoch
    may be partial, so samples are counted as they came). An interval of 0 is never due.
    """
    if interval is None or interval.value == 0:
        return False
    ts = state.timestamp
    if interval.unit == "ep":
        return at_epoch_end and ts.epoch % interval.value == 0
    if at_epoch_end:
        return False
    if interval.unit == "ba":
        return ts.batch % interval.value == 0
    return (ts.sample // interval.value) != ((ts.sample - state.last_batch_samples) // interval.value)


def evaluate(state: State, engine: Engine) -> None:
    """Run the evaluator (if any) and record its result in ``state.eval_history``."""
    if state.evaluator is None:
        return
    engine.run(Event.EVAL_START)
    state.model.eval()
    result = state.evaluator(state)
    state.model.train()
    record = {"epoch": state.finished_epochs, "batch": state.timestamp.batch, **result}
    state.eval_history.append(record)
    engine.run(Event.EVAL_END)


def fit(state: State, engine: Engine) -> State:
    """Train until ``state.max_duration`` or until a hook sets ``state.stop_reason``.

    Evaluation runs every ``state.eval_interval`` (never when it is 0) and once more at the end if
    the last step was not evaluated. Checkpoints are written by the checkpoint callback on
    batch/epoch/fit end.
    """
    engine.run(Event.FIT_START)
    state.model.train()
    # One loader iterator for the whole fit: it runs across epochs, so workers keep prefetching
    # through epoch boundaries. It starts at the (resumed) data position.
    state.train_loader.batch_sampler.set_position(state.timestamp.epoch, state.timestamp.batch_in_epoch)
    batches = None
    if not state.done():
        batches = DevicePrefetcher(iter(state.train_loader), state.device, enabled=state.prefetch_to_device)
    while not state.done() and state.stop_reason is None:
        ts = state.timestamp
        engine.run(Event.EPOCH_START)
        while ts.batch_in_epoch < state.batches_per_epoch:
            # Time spent blocked on the loader: what the device waits for data.
            wait_start = time.perf_counter()
            image, label = next(batches)  # already on the device
            data_wait = time.perf_counter() - wait_start
            if state.augmenter is not None:
                image, label = state.augmenter(image, label)
            state.batch = (image, label)
            engine.run(Event.BATCH_START)
            state.step_metrics = {"loss/train": train_batch(state, engine), "time/data_wait_s": data_wait}
            global_samples = image.shape[0] * state.world_size
            state.last_batch_samples = global_samples
            ts.batch += 1
            ts.batch_in_epoch += 1
            ts.sample += global_samples
            ts.sample_in_epoch += global_samples
            state.batch = None
            if interval_due(state.eval_interval, state, at_epoch_end=False):
                evaluate(state, engine)
            engine.run(Event.BATCH_END)
            if state.done() or state.stop_reason is not None:
                break
        if ts.batch_in_epoch >= state.batches_per_epoch:
            ts.epoch += 1
            ts.batch_in_epoch = 0
            ts.sample_in_epoch = 0
            if interval_due(state.eval_interval, state, at_epoch_end=True):
                evaluate(state, engine)
            engine.run(Event.EPOCH_END)
    # A final evaluation unless evaluation is off (interval 0), the last step was just evaluated,
    # or the run was asked to stop.
    evaluated_last = bool(state.eval_history) and state.eval_history[-1]["batch"] == state.timestamp.batch
    evaluation_on = state.eval_interval is not None and state.eval_interval.value > 0
    if state.evaluator is not None and evaluation_on and state.stop_reason is None and not evaluated_last:
        evaluate(state, engine)
    engine.run(Event.FIT_END)
    return state
