"""The model of a checkpoint, or the ensemble of several, ready for inference: what ``unet-eval`` and
``unet-predict`` (:mod:`predict`) load.

:func:`load_model` rebuilds a checkpoint's model from the config stored in it (with command-line
overrides such as ``eval.mirror_tta=true device=cpu precision=fp32``), as a :class:`LoadedModel`.
On the CPU, ``unet-predict`` runs it (or an ensemble) through :func:`with_cpu_path`: the fastest path that is
exact enough (:mod:`~unet_trainer.evaluation.cpu_path`), settled on the first volume predicted, said in one line.

Ensembles (:func:`load_models`): the fold models of a ``unet-cv`` folder, or any checkpoints whose
predictions mean the same thing.

:class:`EnsembleModel` offers what :func:`predict.predict_case` uses of a
:class:`LoadedModel` (``probabilities``, ``in_channels``, ``region_mode``, ``device``,
``cfg``...), so an ensemble's labels take exactly the single model's path from probabilities to
the written file. Its probabilities are the mean of its models' softmax (or, in region mode,
sigmoid) probabilities, each model run once over the volume with its own sliding window
(``LoadedModel.sliding_window``: mirror TTA when its ``eval.mirror_tta`` is on), accumulated on
the device into one buffer: memory stays that of one model's prediction of one volume, whatever
the number of models.

Models may be averaged when their outputs and inputs agree (:data:`CONVENTION_KEYS`): region mode
(from the loss), number of outputs, label numbering of DLE arrays, input channels and the
preparation of the input (its target spacing), since every case is prepared once for all of them.
Their architectures, patch sizes, folds and training settings may differ.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch

from ..config.config import load_yaml, resolve_from_base
from ..config.engine import ConfigError, config_differences
from ..core.checkpoint import CheckpointError, load_checkpoint, one_line
from ..core.checkpoints import CheckpointManager
from ..core.runfolder import RunFolderError, live_holder
from ..data.prepare import PrepareSettings
from ..data.schemes import LabelScheme
from ..evaluation.cpu_path import (
    CpuChoice,
    CpuFeatures,
    CpuPath,
    centre_crop,
    cpu_features,
    plan_cpu_path,
    set_channels_last,
    settle_cpu_path,
)
from ..evaluation.evaluation import logits_to_probabilities, probabilities_to_labels
from ..evaluation.inference import SlidingWindow
from ..models.base import SegmentationModel, optimize_model
from .builders import (
    CONVENTION_KEYS,
    EvalSettings,
    ModelConventions,
    build_conventions,
    build_eval_settings,
    build_inference_model,
    build_scheme,
    build_sliding_window,
    finish_rule,
)
from .datasets import build_prepare_settings
from .folders import CV_CONFIG, FinishRule, chosen_checkpoint, fold_folders, fold_state
from .resume import RESUME_FREE_KEYS


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
    def conventions(self) -> ModelConventions:
        """What its outputs and inputs mean (region mode, outputs, DLE labels, channels, spacing)."""
        return build_conventions(self.cfg)

    @property
    def prepare_settings(self) -> PrepareSettings:
        """How a case is prepared for it, as its training data was."""
        return build_prepare_settings(self.cfg)

    @property
    def eval_settings(self) -> EvalSettings:
        """How its config scores (empty policy, lesion-wise settings)."""
        return build_eval_settings(self.cfg)

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

    @property
    def scheme(self) -> LabelScheme:
        """The label scheme the model was trained on (its config's ``data.scheme``)."""
        return build_scheme(self.cfg)

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
        regions in region mode, on ``device`` (what :class:`EnsembleModel`
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
    device, model = build_inference_model(cfg)
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
        region_mode=build_conventions(cfg).region_mode,
        checkpoint=path.resolve(),
        weights=name,
        timestamp=dict(state.get("timestamp") or {}),
    )


# Keys expected to differ between the fold models of one cross-validation (not worth a note).
FOLD_KEYS = ("data.fold", "run_name", "save_folder", "callbacks.mlflow.run_name")


class EnsembleError(CheckpointError):
    """Checkpoints that cannot be averaged, or a folder holding none to average (one line)."""


@dataclass
class EnsembleModel:
    """Several :class:`LoadedModel` predicting as one: their probabilities averaged.

    Attributes:
        members: the models, in the order given; the first one's config stands for the ensemble
            (preparation settings, device), which :func:`check_compatible` makes safe.
    """

    members: list[LoadedModel]

    @property
    def cfg(self) -> dict:
        return self.members[0].cfg

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def region_mode(self) -> bool:
        return self.members[0].region_mode

    @property
    def in_channels(self) -> int:
        return self.members[0].in_channels

    @property
    def scheme(self) -> LabelScheme:
        """The members' label scheme (:func:`check_compatible` makes their classes agree)."""
        return self.members[0].scheme

    @property
    def num_outputs(self) -> int:
        return self.members[0].num_outputs

    @property
    def checkpoint(self) -> Path:
        """The first member's checkpoint (for messages about what every member shares)."""
        return self.members[0].checkpoint

    @property
    def checkpoints(self) -> list[Path]:
        return [m.checkpoint for m in self.members]

    @property
    def prepare_settings(self) -> PrepareSettings:
        """The first member's, which :func:`check_compatible` makes every member's."""
        return self.members[0].prepare_settings

    @property
    def timestamp(self) -> dict:
        """No single training progress: the members' differ."""
        return {}

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """The members' mean probabilities of a prepared volume.

        Args:
            image: float32 (C, Z, Y, X), on any device (moved to each member's).

        Returns:
            float32 (K, Z, Y, X) on ``device``: softmax classes or sigmoid regions, averaged.
        """
        total = None
        for member in self.members:
            probs = member.probabilities(image.to(member.device)).to(self.device)
            if total is None:
                total = probs
            else:
                total.add_(probs)
            del probs  # the next member's logits take its place
        return total.div_(len(self.members))


def check_compatible(members: Sequence[LoadedModel]) -> list[str]:
    """Whether the models' probabilities can be averaged.

    Returns:
        The config keys in which some member differs from the first, other than the conventions
        (which agree) and the keys that differ between folds (e.g. ``model.filters``), for a note.

    Raises:
        EnsembleError: two checkpoints whose conventions differ (one line naming both and the key).
    """
    first = members[0]
    notes: list[str] = []
    for other in members[1:]:
        for (name, a), (_, b) in zip(first.conventions.named(), other.conventions.named()):
            if a != b:
                raise EnsembleError(
                    f"{first.checkpoint} and {other.checkpoint} cannot be ensembled: their {name} differ "
                    f"({a} vs {b}); an ensemble's models must agree on "
                    f"{', '.join(n for n, _ in CONVENTION_KEYS)} (architectures may differ)"
                )
        for key in config_differences(first.cfg, other.cfg):
            fold_key = any(key == k or key.startswith(k + ".") for k in FOLD_KEYS)
            if not fold_key and key.split(".")[0] not in RESUME_FREE_KEYS and key not in notes:
                notes.append(key)
    return notes


def stored_finish_rule(checkpoint: Path, stored: dict) -> FinishRule:
    """What makes the run of a checkpoint finished, by the config stored in it (resolved again).

    Raises:
        ConfigError: the stored config cannot be read.
    """
    return finish_rule(resolve_from_base(stored, [], source=f"{checkpoint} (stored config)"))


def folder_checkpoints(folder: Path, choice: str = "best") -> list[tuple[Path, str]]:
    """The checkpoints a folder stands for: each fold's chosen checkpoint of a ``unet-cv`` folder
    (folds in order), or the chosen checkpoint of a single run folder.

    Returns:
        [(checkpoint, "fold <k>, best" ...)].

    Raises:
        EnsembleError: no fold or run folder there, a fold without checkpoints, unfinished or
            training right now (naming the process), or (with the folder's ``cv_config.yaml``) a
            fold missing.
    """
    folder = Path(folder)
    folds = fold_folders(folder)
    if not folds and CheckpointManager.of_run(folder).folder.is_dir():
        folds = [(None, folder)]
    if not folds:
        raise EnsembleError(
            f"{folder}: a folder, but neither a unet-cv folder (fold_<k>/ run folders) nor a run folder "
            "(checkpoints/); give checkpoint files"
        )
    record = folder / CV_CONFIG
    if record.is_file():
        try:
            num_folds = int(load_yaml(record)["data"]["num_folds"])
        except ConfigError as exc:  # load_yaml's line names the file
            raise EnsembleError(str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise EnsembleError(f"{record}: not readable ({exc})") from None
        missing = sorted(set(range(num_folds)) - {k for k, _ in folds})
        if missing:
            raise EnsembleError(
                f"{folder}: fold(s) {', '.join(map(str, missing))} of {num_folds} missing; train them "
                f"(unet-cv CONFIG --folds {','.join(map(str, missing))}) or give the checkpoints to use"
            )
    found = []
    for fold, run_dir in folds:
        what = f"fold {fold}" if fold is not None else "run"
        try:
            state = fold_state(run_dir, -1 if fold is None else fold, own_rule=stored_finish_rule)
        except (ConfigError, RunFolderError) as exc:
            raise EnsembleError(str(exc)) from None
        holder = live_holder(run_dir) if not state.finished else None
        if holder is not None:
            so_far = f"its newest checkpoint at batch {state.batch}" if state.checkpoint else "no checkpoint yet"
            raise EnsembleError(
                f"{run_dir}: {what} is training right now ({holder}; {so_far}); wait for it to finish, "
                "or give the checkpoints to use"
            )
        if state.checkpoint is None:
            raise EnsembleError(f"{run_dir}: {what} has no checkpoint that loads")
        if not state.finished:
            raise EnsembleError(
                f"{run_dir}: {what} is {state.status}; finish it (run its command again) or give the checkpoints to use"
            )
        checkpoint, why = chosen_checkpoint(state, choice)
        found.append((checkpoint, f"{what}, {why}"))
    return found


def expand_checkpoints(paths: Sequence[Path], choice: str = "best") -> list[tuple[Path, str]]:
    """Checkpoint arguments -> checkpoint files: a file stays, a folder expands (:func:`folder_checkpoints`).

    Returns:
        [(checkpoint, where it came from in words, "" for a file given)].
    """
    found: list[tuple[Path, str]] = []
    for path in map(lambda p: Path(p).expanduser(), paths):
        found += folder_checkpoints(path, choice) if path.is_dir() else [(path, "")]
    return found


def load_models(
    paths: Path | Sequence[Path], overrides: Sequence[str] = (), log: TextIO | None = None
) -> LoadedModel | EnsembleModel:
    """One checkpoint's model, or the ensemble of several (folders expanded).

    Args:
        paths: checkpoint files and ``unet-cv``/run folders.
        overrides: config overrides applied to every model (e.g. ``eval.mirror_tta=true``).
        log: where the ensemble's members (and a note on configs that differ) are listed
            (default stderr).

    Raises:
        EnsembleError: models that cannot be averaged, or a folder without usable checkpoints.
        CheckpointError, ConfigError: as :func:`load_model`.
    """
    log = sys.stderr if log is None else log
    given = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    found = expand_checkpoints(given)
    if len(found) == 1:
        path, where = found[0]
        if where:
            print(f"Model: {path} ({where})", file=log)
        return load_model(path, overrides)
    members = [load_model(path, overrides) for path, _ in found]
    notes = check_compatible(members)
    print(f"Ensemble of {len(members)} models (probabilities averaged):", file=log)
    for member, (_, where) in zip(members, found):
        print(f"  {member.checkpoint}{f' ({where})' if where else ''}", file=log)
    if notes:
        shown = ", ".join(notes[:8]) + (" ..." if len(notes) > 8 else "")
        print(f"note: the models' configs differ in {shown} (their outputs and inputs agree)", file=log)
    return EnsembleModel(members)


# --------------------------------------------------------------------------------------------
# The CPU path (evaluation.cpu_path): chosen on the first volume predicted
# --------------------------------------------------------------------------------------------


def _members(predictor: LoadedModel | EnsembleModel) -> list[LoadedModel]:
    return predictor.members if isinstance(predictor, EnsembleModel) else [predictor]


def use_cpu_path(predictor: LoadedModel | EnsembleModel, path: CpuPath) -> None:
    """Run every model of ``predictor`` in ``path``'s precision and memory format from now on."""
    for member in _members(predictor):
        set_channels_last(member.model, path.channels_last)
        member.sliding_window = replace(member.sliding_window, amp_dtype=path.amp_dtype)


def check_labels(predictor: LoadedModel | EnsembleModel, image: torch.Tensor, path: CpuPath) -> torch.Tensor:
    """The canonical labels (*S) of a small prepared volume (C, *S) with ``predictor`` switched to ``path``,
    its models' probabilities averaged, without mirroring (a check of precision, not of the test-time
    augmentation)."""
    use_cpu_path(predictor, path)
    members = _members(predictor)
    total = None
    for member in members:
        window = replace(member.sliding_window, mirror=False)
        probs = logits_to_probabilities(window(member.model, image.to(member.device)), member.region_mode)
        total = probs if total is None else total.add_(probs)
    return probabilities_to_labels(total.div_(len(members)), predictor.region_mode, predictor.scheme)


class AutoCpuPath:
    """A checkpoint's model, or an ensemble, on the CPU, whose path (:mod:`~unet_trainer.evaluation.cpu_path`)
    is settled on the first volume it predicts; otherwise it is the model it wraps (every attribute but
    :meth:`probabilities` is the wrapped one's).

    Args:
        inner: the model(s), on the CPU.
        requested: a key of :data:`~unet_trainer.evaluation.cpu_path.CPU_PATH_CHOICES`.
        log: where the one line saying which path was taken, and why, goes.
        features: the CPU's flags (default: read here, :func:`~unet_trainer.evaluation.cpu_path.cpu_features`).
    """

    def __init__(
        self,
        inner: LoadedModel | EnsembleModel,
        requested: str,
        log: TextIO,
        features: CpuFeatures | None = None,
    ):
        self.inner, self.log = inner, log
        self.plan = plan_cpu_path(requested, features or cpu_features())
        self.choice: CpuChoice | None = None

    def __getattr__(self, name: str):
        if name == "inner":  # not yet set (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """As the wrapped model's, after settling the path on the first call (float32 (K, Z, Y, X))."""
        if self.choice is None:
            crop = centre_crop(image, _members(self.inner)[0].patch_size)
            self.choice = settle_cpu_path(
                self.plan, lambda path: check_labels(self.inner, crop, path), self.inner.scheme
            )
            use_cpu_path(self.inner, self.choice.path)
            print(self.choice.message, file=self.log)
        return self.inner.probabilities(image)


def with_cpu_path(
    predictor: LoadedModel | EnsembleModel, requested: str | None, overrides: Sequence[str], log: TextIO
) -> LoadedModel | EnsembleModel | AutoCpuPath:
    """``predictor`` as it runs on its device: on the CPU an :class:`AutoCpuPath` (``requested``; None: auto),
    unless the command line gives ``precision``, which is then taken exactly (``precision=fp32``: exactly fp32);
    elsewhere ``predictor`` itself.

    Raises:
        ConfigError: ``requested`` on a GPU, with a ``precision`` override, or not a path's name.
    """
    explicit_precision = any(o.lstrip("-").split("=", 1)[0] == "precision" for o in overrides)
    if requested is not None and (predictor.device.type != "cpu" or explicit_precision):
        why = f"the device is {predictor.device.type}" if predictor.device.type != "cpu" else "precision is given"
        raise ConfigError(f"command line: --cpu-path {requested} applies on the CPU only, without precision ({why})")
    if predictor.device.type != "cpu":
        return predictor
    if explicit_precision:
        amp = _members(predictor)[0].sliding_window.amp_dtype
        taken = "fp32" if amp is None else f"{str(amp).removeprefix('torch.')} autocast"
        print(f"CPU path: {taken} (as the command line's precision asks)", file=log)
        return predictor
    try:
        return AutoCpuPath(predictor, requested or "auto", log)
    except ValueError as exc:
        raise ConfigError(f"command line: --cpu-path: {exc}") from None
