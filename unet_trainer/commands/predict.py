"""Prediction from a checkpoint or an ensemble: the logic behind ``unet-predict``.

Plain-argument functions; the command-line parsing lives in :mod:`unet_trainer.cli`.
:func:`predict_dataset` segments raw cases in any supported layout with the models
:func:`loading.load_models` rebuilds (with command-line overrides such as ``eval.mirror_tta=true
device=cpu precision=fp32``), and writes one NIfTI per case in the case's original geometry and
native label convention. Scoring a model is :mod:`evaluate`'s.

Putting a prediction back into the original geometry (:func:`prediction_to_original`): the
prepared volume is the raw array cropped to the nonzero bounding box (``meta["crop_box"]``, in
raw (Z, Y, X) voxels) and, when a target spacing is set, resampled. So the probabilities are first
resampled back to the crop's size (trilinear, as the image was), then labelled (argmax or region
thresholds), then pasted into a volume of the raw shape (``meta["original_shape"]``): outside
the crop is background (label 0; probability 1 for the background class, 0 for every other
class or region). The label map is written with the raw affine and in the source's label
convention (BraTS 2021: 0/1/2/4; MSD and DLE: MSD numbering; BraTS 2023: 0/1/2/3). DLE arrays have
no geometry; their predictions get the identity affine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config.engine import ConfigError
from ..core.fileio import remove_orphan_temporaries
from ..core.guard import check_outputs
from ..core.runfolder import PREDICT_LOCK_NAME, FolderLock
from ..data.layouts import (
    CONVENTION_SCHEME,
    LAYOUTS,
    CaseFiles,
    DataFormatError,
    RawCase,
    classes_present,
    list_cases,
    read_case,
    write_label_nifti,
    write_probabilities_nifti,
)
from ..data.layouts.files import PROBABILITIES_SUFFIX
from ..data.prepare import PrepareSettings, prepare_case
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from ..evaluation.evaluation import logits_to_probabilities, probabilities_to_labels
from ..evaluation.inference import speed_up_inference
from ..evaluation.visualize import draw_case_overlay, extract_case_view
from .exported import ExportedModel, exported_device, is_exported_folder, load_exported
from .loading import AutoCpuPath, EnsembleModel, LoadedModel, load_models, with_cpu_path

# What predicts: a checkpoint's model, an ensemble's, or an exported folder's.
Predictor = LoadedModel | EnsembleModel | ExportedModel | AutoCpuPath

PREDICT_FOLDER_ADVICE = "one unet-predict per output folder: wait for it to finish, or write to another OUTPUT folder"


# --------------------------------------------------------------------------------------------
# Back to the original geometry
# --------------------------------------------------------------------------------------------


def _crop_shape(meta: dict) -> tuple[int, ...]:
    return tuple(int(b) - int(a) for a, b in meta["crop_box"])


def uncrop(values: torch.Tensor, meta: dict, fill: Sequence[float]) -> torch.Tensor:
    """Paste crop-sized values into a volume of the raw shape.

    Args:
        values: (K, *crop) where crop is the size of ``meta["crop_box"]``.
        meta: prepared-case metadata with ``crop_box`` and ``original_shape`` (Z, Y, X).
        fill: one value per channel for voxels outside the crop.

    Returns:
        (K, *original_shape), same dtype and device as ``values``.

    Raises:
        ValueError: ``values`` does not have the crop's size.
    """
    crop = _crop_shape(meta)
    if tuple(values.shape[1:]) != crop:
        raise ValueError(f"values of spatial shape {tuple(values.shape[1:])} do not fit crop box {meta['crop_box']}")
    out = torch.empty((values.shape[0],) + tuple(meta["original_shape"]), dtype=values.dtype, device=values.device)
    out.copy_(torch.as_tensor(list(fill), dtype=values.dtype, device=values.device).view(-1, 1, 1, 1).expand_as(out))
    box = tuple(slice(int(a), int(b)) for a, b in meta["crop_box"])
    out[(slice(None),) + box] = values
    return out


def labels_to_original(labels: torch.Tensor | np.ndarray, meta: dict) -> np.ndarray:
    """A canonical label map of the prepared volume -> the raw (Z, Y, X) grid.

    Undoes resampling (nearest neighbour, ``nearest-exact`` as preparation used) when the prepared
    shape differs from the crop, then un-crops with background.

    Args:
        labels: (Z', Y', X') canonical labels of the prepared case.
        meta: its prepared metadata.

    Returns:
        uint8 (Z, Y, X) = ``meta["original_shape"]``.
    """
    labels = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    crop = _crop_shape(meta)
    if tuple(labels.shape) != crop:
        labels = F.interpolate(labels[None, None].float(), size=crop, mode="nearest-exact")[0, 0]
    return uncrop(labels.to(torch.uint8)[None], meta, [0])[0].cpu().numpy()


def prediction_to_original(
    logits: torch.Tensor,
    meta: dict,
    region_mode: bool,
    probabilities: bool = False,
    scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of a prepared volume -> labels (and probabilities) on the raw grid.

    Probabilities are resampled back to the crop's size (trilinear) when the case was resampled,
    labelled there, and un-cropped (see the module docstring); all on the logits' device.

    Args:
        logits: float32 (K, Z', Y', X') of the prepared case.
        meta: its prepared metadata (``crop_box``, ``original_shape``).
        region_mode: sigmoid outputs of the scheme's trained regions instead of softmax classes.
        probabilities: also return the probabilities on the raw grid.
        scheme: the label scheme whose regions region outputs paint into classes.

    Returns:
        (class indices uint8 (Z, Y, X), float32 (K, Z, Y, X) probabilities or None).
    """
    probs = logits_to_probabilities(logits, region_mode)
    return probabilities_to_original(probs, meta, region_mode, probabilities, scheme)


def probabilities_to_original(
    probs: torch.Tensor,
    meta: dict,
    region_mode: bool,
    probabilities: bool = False,
    scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of a prepared volume -> labels (and probabilities) on the raw grid; as
    :func:`prediction_to_original`, from float32 (K, Z', Y', X') probabilities."""
    crop = _crop_shape(meta)
    if tuple(probs.shape[1:]) != crop:
        probs = F.interpolate(probs[None], size=crop, mode="trilinear", align_corners=False)[0]
    labels = uncrop(probabilities_to_labels(probs, region_mode, scheme)[None], meta, [0])[0].cpu().numpy()
    if not probabilities:
        return labels, None
    background = [0.0] * probs.shape[0]
    if not region_mode:
        background[0] = 1.0
    return labels, uncrop(probs, meta, background).cpu().numpy()


# --------------------------------------------------------------------------------------------
# unet-predict
# --------------------------------------------------------------------------------------------


def predict_case(
    loaded: Predictor,
    raw: RawCase,
    settings: PrepareSettings | None = None,
    probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment one raw case: prepare it in memory as training did, predict (one model, or an
    ensemble's averaged probabilities), put back.

    Returns:
        (canonical labels uint8 (Z, Y, X) on the raw grid, float32 (K, Z, Y, X) probabilities or None).

    Raises:
        DataFormatError: the case's channels do not match the model's input channels.
    """
    channels = raw.image.shape[0]
    if channels != loaded.in_channels:
        raise DataFormatError(
            f"case {raw.case_id}: has {channels} channel(s) but the model of {loaded.checkpoint.name} takes "
            f"{loaded.in_channels} ({', '.join(loaded.scheme.channels)})"
        )
    image, _, meta = prepare_case(raw, settings if settings is not None else PrepareSettings())
    with torch.no_grad():
        probs = loaded.probabilities(torch.from_numpy(np.ascontiguousarray(image)).to(loaded.device))
        return probabilities_to_original(probs, meta, loaded.region_mode, probabilities, loaded.scheme)


def _check_written_scheme(case_id: str, target: LabelScheme, model: LabelScheme) -> None:
    """Where a dataset.json defines either side's scheme, the folder's files hold class indices of
    their own meaning: the model must predict exactly those classes.

    Raises:
        DataFormatError: the schemes differ in channels, classes or regions (one line).
    """
    if (target.definition or model.definition) and not target.compatible_with(model):
        raise DataFormatError(
            f"case {case_id}: its folder numbers the labels of scheme {target.name} ({', '.join(target.classes)}), "
            f"not those of the model's {model.name} ({', '.join(model.classes)})"
        )


@dataclass
class PredictSummary:
    """What :func:`predict_dataset` did: files written per case id, and failed cases' messages."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def prediction_title(case_id: str, labels: np.ndarray, spacing: Sequence[float], loaded: Predictor) -> str:
    """``case | prediction, epoch 50 | WT 41.2 mL  TC 12.0 mL  ET 6.3 mL`` (the volumes of the label
    scheme's regions in a class-index map with voxels of ``spacing`` mm)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    regions = loaded.scheme.regions
    volumes = "  ".join(f"{r} {np.isin(labels, members).sum() * voxel_ml:.1f} mL" for r, members in regions.items())
    epoch = loaded.timestamp.get("epoch")
    return f"{case_id} | prediction{f', epoch {epoch}' if epoch is not None else ''} | {volumes}"


def _clear_and_report(output_dir: Path, unlisted: dict[str, str], summary: PredictSummary, log: TextIO) -> None:
    """Under the output folder's lock: remove the temporaries a killed unet-predict left, and report the
    cases that could not be listed (``unlisted``: case id -> why) as failed in ``summary`` and on ``log``."""
    # Under the lock no other unet-predict writes here: a temporary of an output is an orphan.
    removed = remove_orphan_temporaries(output_dir, is_prediction_file)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {output_dir} by an interrupted run", file=log)
    for case_id, error in sorted(unlisted.items()):
        summary.failed[case_id] = error
        print(f"skipped {case_id}: {error}", file=log)


def predict_dataset(
    checkpoint: Path | Sequence[Path],
    input_dir: Path,
    output_dir: Path,
    fmt: str = "auto",
    overrides: Sequence[str] = (),
    probabilities: bool = False,
    progress: bool = True,
    log: TextIO | None = None,
    overlays: bool = False,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    runtime: str | None = None,
    cpu_path: str | None = None,
) -> PredictSummary:
    """Segment every case of a raw dataset and write the results as NIfTI files.

    Writes ``output_dir/{case_id}.nii.gz`` (uint8 labels in the case's native convention, raw shape
    and affine), with ``probabilities`` also ``output_dir/{case_id}_probabilities.nii.gz``
    (float32 (x, y, z, K)), and with ``overlays`` ``output_dir/{case_id}_overlay.png`` (the
    prediction's contours on three FLAIR slices through it, with region volumes in the title). A
    case that cannot be read or does not fit the model is reported on ``log`` in one line and
    skipped; the others are still written. The output folder is locked meanwhile (a second
    unet-predict into it stops at once), and the temporaries of outputs a killed unet-predict left
    in it are removed.

    Args:
        checkpoint: the ``unet-train`` checkpoint; or several, and ``unet-cv`` folders (each
            fold's chosen checkpoint), whose probabilities are averaged
            (:mod:`unet_trainer.commands.loading`); or one folder of ``unet-export``
            (:mod:`unet_trainer.commands.exported`: its settings are its model.json's, and the only override
            taken is ``device``).
        input_dir: raw cases in any supported layout; labels are not needed (and not used).
        output_dir: created if missing; must not be, lie inside or hold ``input_dir``, nor be or
            hold a checkpoint (or model folder) it reads.
        fmt: layout name or "auto".
        overrides: config overrides (e.g. ``eval.mirror_tta=true``, ``device=cpu``).
        probabilities: also write the probabilities.
        progress: a progress bar on stderr (drawn only on a terminal).
        log: where skipped cases are reported (default stderr).
        overlays: also draw a PNG per case.
        postprocess: applied to each case's canonical labels (Z, Y, X) on the raw grid before
            they are written or drawn (e.g. a :class:`unet_trainer.evaluation.postprocessing.Postprocessing`);
            the probabilities stay the model's.
        runtime, cpu_path: the format an exported folder runs, how checkpoints run on the CPU (:func:`load_predictor`).

    Returns:
        The :class:`PredictSummary`.

    Raises:
        CheckpointError, ConfigError: as :func:`load_model`; EnsembleError (a CheckpointError):
            checkpoints that cannot be averaged (see :func:`loading.load_models`); ExportError (a
            CheckpointError): an exported folder that cannot be read; ConfigError: ``runtime``, ``cpu_path`` misplaced.
        DataFormatError: the input folder is missing, holds no recognised layout or no case,
            or a listing problem of the whole folder (a case missing a modality file is skipped and
            reported instead).
        OutputPathError: output_dir clashes with an input (see ``output_dir``); nothing is written.
        RunFolderError: another unet-predict is writing into ``output_dir`` (names it).
    """
    log = sys.stderr if log is None else log
    input_dir, output_dir = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    given = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(c) for c in checkpoint]
    loaded = load_predictor(given, overrides, log, runtime, cpu_path)
    # A case whose files are incomplete (a missing modality) is skipped like one that cannot be read.
    unlisted: dict[str, str] = {}
    cases = list_cases(input_dir, fmt, require_labels=False, bad=unlisted)
    if not cases and not unlisted:
        raise DataFormatError(f"{input_dir}: no cases found")
    # A run or unet-cv folder given as a model is kept whole, and so is each checkpoint it stands for.
    models = [("the model folder" if path.is_dir() else "the checkpoint", path) for path in given]
    models += [("the checkpoint", path) for path in loaded.checkpoints]
    check_outputs([("the output folder", output_dir)], folders=[("the input dataset", input_dir)], files=models)
    speed_up_inference(loaded.device)
    summary = PredictSummary()
    lock = FolderLock(output_dir, PREDICT_LOCK_NAME, PREDICT_FOLDER_ADVICE, remove_on_release=True).acquire()
    try:
        _clear_and_report(output_dir, unlisted, summary, log)
        _predict_cases(loaded, cases, output_dir, probabilities, progress, log, overlays, postprocess, summary)
    finally:
        lock.release()
    return summary


def load_predictor(
    given: Sequence[Path],
    overrides: Sequence[str],
    log: TextIO,
    runtime: str | None = None,
    cpu_path: str | None = None,
) -> Predictor:
    """An exported folder's model (one folder with a model.json), else the checkpoints' (:func:`load_models`;
    on the CPU in the path :func:`loading.with_cpu_path` takes).

    Args:
        runtime: the format an exported folder runs ("onnx", "torchscript"; None: the first it holds).
        cpu_path: how checkpoints run on the CPU ("auto", "fp32", "bf16"; None: auto), said in one line on ``log``.

    Raises:
        ConfigError: ``runtime`` for checkpoints, ``cpu_path`` for an exported folder, or an override an
            exported folder does not take.
        ExportError, CheckpointError, EnsembleError: as :func:`load_exported`, :func:`load_models`.
    """
    if len(given) == 1 and is_exported_folder(given[0]):
        if cpu_path is not None:
            raise ConfigError(
                f"command line: --cpu-path {cpu_path} applies to checkpoints; an exported graph runs as exported"
            )
        loaded = load_exported(given[0], runtime, exported_device(list(overrides)))
        print(f"Model: {given[0]} (exported, {loaded.fmt} on {loaded.device.type})", file=log)
        return loaded
    if runtime is not None:
        raise ConfigError(f"command line: --runtime {runtime} applies to a folder of unet-export only")
    return with_cpu_path(load_models(given, overrides, log), cpu_path, overrides, log)


def is_prediction_file(name: str) -> bool:
    """Whether ``name`` is one unet-predict writes (``<case>.nii.gz``, ``<case>_probabilities.nii.gz``,
    ``<case>_overlay.png``; ``.nii`` too), so its temporaries are unet-predict's to clear."""
    return name.endswith((".nii.gz", ".nii", "_overlay.png"))


def _predict_cases(
    loaded: Predictor,
    cases: Sequence[CaseFiles],
    output_dir: Path,
    probabilities: bool,
    progress: bool,
    log: TextIO,
    overlays: bool,
    postprocess: Callable[[np.ndarray], np.ndarray] | None,
    summary: PredictSummary,
) -> None:
    """:func:`predict_dataset` once the output folder is locked: fills ``summary``."""
    settings = loaded.prepare_settings  # as the training data was prepared
    bar = tqdm(cases, desc="predict", unit="case", disable=None if progress else True)
    for case in bar:
        try:
            raw = read_case(case, settings.dle_labels)
            labels, probs = predict_case(loaded, raw, settings, probabilities)
            if postprocess is not None:
                labels = postprocess(labels)
            present = classes_present(labels)
            convention = LAYOUTS[case.format].convention_holding(
                present, settings.dle_labels, raw.label_convention, (case,)
            )
            _check_written_scheme(case.case_id, SCHEMES[CONVENTION_SCHEME[convention]], loaded.scheme)
        except DataFormatError as exc:
            summary.failed[case.case_id] = str(exc)
            bar.write(f"skipped {case.case_id}: {exc}", file=log)
            continue
        label_path = output_dir / f"{case.case_id}.nii.gz"
        write_label_nifti(label_path, labels, raw.affine, convention)
        summary.written[case.case_id] = [label_path]
        if probs is not None:
            prob_path = output_dir / f"{case.case_id}{PROBABILITIES_SUFFIX}.nii.gz"
            write_probabilities_nifti(prob_path, probs, raw.affine)
            summary.written[case.case_id].append(prob_path)
        if overlays:
            png_path = output_dir / f"{case.case_id}_overlay.png"
            view = extract_case_view(case.case_id, raw.image, None, labels, raw.spacing)
            title = prediction_title(case.case_id, labels, raw.spacing, loaded)
            draw_case_overlay(png_path, view, title, loaded.scheme)
            summary.written[case.case_id].append(png_path)
