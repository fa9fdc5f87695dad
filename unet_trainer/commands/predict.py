"""Evaluation and prediction from a checkpoint: the logic behind ``unet-eval`` and ``unet-predict``.

Plain-argument functions; the command-line parsing lives in :mod:`unet_trainer.cli`.

* :func:`loading.load_model` rebuilds the model of a checkpoint from the config stored in it (with
  command-line overrides such as ``eval.mirror_tta=true device=cpu precision=fp32``).
* :func:`evaluate_checkpoint` scores it on the validation fold of its own config, or on every
  labelled case of another raw dataset, through the same prepared cache and evaluator as training;
  :func:`choose_for_checkpoint` (``unet-eval --choose-postprocessing``) also chooses the run's
  postprocessing on those predictions.
* :func:`predict_dataset` segments raw cases in any supported layout and writes one NIfTI per case
  in the case's original geometry and native label convention.

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

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.checkpoints import checkpoint_run_folder
from ..core.distributed import DistInfo
from ..core.fileio import remove_orphan_temporaries
from ..core.guard import check_outputs
from ..core.runfolder import PREDICT_LOCK_NAME, FolderLock
from ..data.layouts import (
    CANONICAL_CHANNELS,
    REGION_NAMES,
    REGIONS,
    CaseFiles,
    DataFormatError,
    RawCase,
    list_cases,
    read_case,
    write_label_nifti,
    write_probabilities_nifti,
)
from ..data.loader import PreparedCase
from ..data.prepare import PrepareSettings, prepare_case
from ..evaluation import postprocessing as pp
from ..evaluation.evaluation import logits_to_probabilities, probabilities_to_labels, write_cases_csv
from ..evaluation.visualize import draw_case_overlay, evaluator_case_view, extract_case_view, write_overlays
from .builders import (
    build_eval_settings,
    build_evaluator,
    build_split,
    build_split_settings,
    data_input_folders,
    ensure_prepared,
    with_dataset,
)
from .loading import EnsembleModel, LoadedModel, load_model, load_models

PREDICT_FOLDER_ADVICE = "one unet-predict per output folder: wait for it to finish, or write to another OUTPUT folder"


def _speed_up_cuda(device: torch.device) -> None:
    # Every window has the same shape, so cuDNN's per-shape algorithm search pays for itself after
    # the first batch; a process-wide setting, hence only from the command-line entry points.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


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
    logits: torch.Tensor, meta: dict, region_mode: bool, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of a prepared volume -> labels (and probabilities) on the raw grid.

    Probabilities are resampled back to the crop's size (trilinear) when the case was resampled,
    labelled there, and un-cropped (see the module docstring); all on the logits' device.

    Args:
        logits: float32 (K, Z', Y', X') of the prepared case.
        meta: its prepared metadata (``crop_box``, ``original_shape``).
        region_mode: sigmoid (WT, TC, ET) outputs instead of softmax classes.
        probabilities: also return the probabilities on the raw grid.

    Returns:
        (canonical labels uint8 (Z, Y, X), float32 (K, Z, Y, X) probabilities or None).
    """
    return probabilities_to_original(logits_to_probabilities(logits, region_mode), meta, region_mode, probabilities)


def probabilities_to_original(
    probs: torch.Tensor, meta: dict, region_mode: bool, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of a prepared volume -> labels (and probabilities) on the raw grid; as
    :func:`prediction_to_original`, from float32 (K, Z', Y', X') probabilities."""
    crop = _crop_shape(meta)
    if tuple(probs.shape[1:]) != crop:
        probs = F.interpolate(probs[None], size=crop, mode="trilinear", align_corners=False)[0]
    labels = uncrop(probabilities_to_labels(probs, region_mode)[None], meta, [0])[0].cpu().numpy()
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
    loaded: LoadedModel | EnsembleModel,
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
            f"case {raw.case_id}: has {channels} channels ({', '.join(CANONICAL_CHANNELS)}) but "
            f"the model of {loaded.checkpoint.name} takes {loaded.in_channels}"
        )
    image, _, meta = prepare_case(raw, settings if settings is not None else PrepareSettings())
    with torch.no_grad():
        probs = loaded.probabilities(torch.from_numpy(np.ascontiguousarray(image)).to(loaded.device))
        return probabilities_to_original(probs, meta, loaded.region_mode, probabilities)


@dataclass
class PredictSummary:
    """What :func:`predict_dataset` did: files written per case id, and failed cases' messages."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def prediction_title(
    case_id: str, labels: np.ndarray, spacing: Sequence[float], loaded: LoadedModel | EnsembleModel
) -> str:
    """``case | prediction, epoch 50 | WT 41.2 mL  TC 12.0 mL  ET 6.3 mL`` (region volumes of a
    canonical label map with voxels of ``spacing`` mm)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = "  ".join(f"{r} {np.isin(labels, REGIONS[r]).sum() * voxel_ml:.1f} mL" for r in REGION_NAMES)
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
            (:mod:`unet_trainer.commands.loading`).
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

    Returns:
        The :class:`PredictSummary`.

    Raises:
        CheckpointError, ConfigError: as :func:`load_model`; EnsembleError (a CheckpointError):
            checkpoints that cannot be averaged (see :func:`loading.load_models`).
        DataFormatError: the input folder is missing, holds no recognised layout or no case,
            or a listing problem of the whole folder (a case missing a modality file is skipped and
            reported instead).
        OutputPathError: output_dir clashes with an input (see ``output_dir``); nothing is written.
        RunFolderError: another unet-predict is writing into ``output_dir`` (names it).
    """
    log = sys.stderr if log is None else log
    input_dir, output_dir = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    given = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(c) for c in checkpoint]
    loaded = load_models(given, overrides, log)
    # A case whose files are incomplete (a missing modality) is skipped like one that cannot be read.
    unlisted: dict[str, str] = {}
    cases = list_cases(input_dir, fmt, require_labels=False, bad=unlisted)
    if not cases and not unlisted:
        raise DataFormatError(f"{input_dir}: no cases found")
    # A run or unet-cv folder given as a model is kept whole, and so is each checkpoint it stands for.
    models = [("the model folder" if path.is_dir() else "the checkpoint", path) for path in given]
    models += [("the checkpoint", path) for path in loaded.checkpoints]
    check_outputs([("the output folder", output_dir)], folders=[("the input dataset", input_dir)], files=models)
    _speed_up_cuda(loaded.device)
    summary = PredictSummary()
    lock = FolderLock(output_dir, PREDICT_LOCK_NAME, PREDICT_FOLDER_ADVICE, remove_on_release=True).acquire()
    try:
        _clear_and_report(output_dir, unlisted, summary, log)
        _predict_cases(loaded, cases, output_dir, probabilities, progress, log, overlays, postprocess, summary)
    finally:
        lock.release()
    return summary


def is_prediction_file(name: str) -> bool:
    """Whether ``name`` is one unet-predict writes (``<case>.nii.gz``, ``<case>_probabilities.nii.gz``,
    ``<case>_overlay.png``; ``.nii`` too), so its temporaries are unet-predict's to clear."""
    return name.endswith((".nii.gz", ".nii", "_overlay.png"))


def _predict_cases(
    loaded: LoadedModel | EnsembleModel,
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
        except DataFormatError as exc:
            summary.failed[case.case_id] = str(exc)
            bar.write(f"skipped {case.case_id}: {exc}", file=log)
            continue
        label_path = output_dir / f"{case.case_id}.nii.gz"
        write_label_nifti(label_path, labels, raw.affine, raw.label_convention)
        summary.written[case.case_id] = [label_path]
        if probs is not None:
            prob_path = output_dir / f"{case.case_id}_probabilities.nii.gz"
            write_probabilities_nifti(prob_path, probs, raw.affine)
            summary.written[case.case_id].append(prob_path)
        if overlays:
            png_path = output_dir / f"{case.case_id}_overlay.png"
            view = extract_case_view(case.case_id, raw.image, None, labels, raw.spacing)
            draw_case_overlay(png_path, view, prediction_title(case.case_id, labels, raw.spacing, loaded))
            summary.written[case.case_id].append(png_path)


# --------------------------------------------------------------------------------------------
# unet-eval
# --------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """What :func:`evaluate_checkpoint` measured.

    Attributes:
        means: mean over cases of every score key (NaNs left out); Dice keys NCR, ED, EN, WT, TC,
            ET, mean; with HD95 also hd95/WT, hd95/TC, hd95/ET; lesion-wise also lesion_dice/WT ...
            and lesion_hd95/WT ....
        counts: per key, how many cases entered its mean.
        per_case: one row per case: {"case_id", score keys...}.
        csv_path: where the per-case rows were written.
        source: what was scored, in words.
        empty_policy: the empty-ground-truth policy used.
        loaded: the model that was scored.
        overlays: the folder of the overlay PNGs (one per case and summary.png), or None.
        label_convention: the scored cases' own label convention (a key of ``LABEL_CONVENTIONS``;
            "mixed" when they differ), so labels can be named by the values the user's files hold.
    """

    means: dict[str, float]
    counts: dict[str, int]
    per_case: list[dict]
    csv_path: Path
    source: str
    empty_policy: str
    loaded: LoadedModel
    overlays: Path | None = None
    label_convention: str = "mixed"


def default_eval_csv(checkpoint: Path, tag: str) -> Path:
    """``<run folder>/eval_<checkpoint name>_<tag>.csv``: the run folder is the parent of the
    ``checkpoints/`` folder holding the checkpoint (else the checkpoint's own folder)."""
    folder = checkpoint_run_folder(checkpoint)
    safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    return folder / f"eval_{checkpoint.stem}_{safe_tag}.csv"


def _scored_config(cfg: dict, dataset: Path | None, fmt: str) -> tuple[dict, str]:
    """The config whose data :func:`evaluate_checkpoint` scores, and the tag of its default CSV name:
    ``cfg`` itself and "val-fold<k>" (or "val" for a split file) without ``dataset``; with it, a copy
    reading that dataset (its own prepared cache folder, keyed by its path) and the dataset's name."""
    if dataset is None:
        return cfg, build_split_settings(cfg).tag
    # A new config: the loaded model's stays as it was.
    return with_dataset(cfg, dataset, fmt), Path(dataset).expanduser().resolve().name


def _scored_cases(cfg: dict, prepared_ids: list[str], dataset: Path | None) -> tuple[list[str], str]:
    """The case ids :func:`evaluate_checkpoint` scores (every prepared case of ``dataset``, else the
    validation fold) and their description in words.

    Raises:
        DataFormatError: no case to score.
    """
    if dataset is not None:
        case_ids = prepared_ids
        source = f"all {len(case_ids)} labelled cases of {dataset}"
    else:
        case_ids = build_split(cfg, prepared_ids)["val"]
        split = build_split_settings(cfg)
        source = f"validation cases ({split.where}) of {split.data_path or 'the phantom'}"
    if not case_ids:
        raise DataFormatError(f"no cases to evaluate: {source} is empty")
    return case_ids, source


def _write_eval_overlays(overlay_dir: Path, views: dict, per_case: list[dict], loaded: LoadedModel) -> None:
    """Draw every scored case's ``views`` (with its ``per_case`` scores) and the summary grid into
    ``overlay_dir``, titled with the checkpoint's epoch and batch."""
    write_overlays(
        overlay_dir,
        views,
        {row["case_id"]: row for row in per_case},
        None,
        loaded.timestamp.get("epoch"),
        loaded.timestamp.get("batch"),
    )


def evaluate_checkpoint(
    checkpoint: Path,
    overrides: Sequence[str] = (),
    dataset: Path | None = None,
    fmt: str = "auto",
    out_csv: Path | None = None,
    progress: bool = True,
    overlays: bool = True,
    case_sink=None,
) -> EvalReport:
    """Score a checkpoint: Dice per label and region (and HD95 with ``eval.hd95=true``).

    Without ``dataset``: the validation fold of the checkpoint's own config (its data, split and
    preparation, exactly as training evaluated). With ``dataset``: every labelled case of that raw
    folder, prepared through the cache like training data. Scoring runs on the prepared (cropped)
    volumes, as during training; outside the crop both prediction and truth are background, so
    Dice and HD95 equal their values on the raw grid.

    Args:
        checkpoint: the ``unet-train`` checkpoint.
        overrides: config overrides, e.g. ``eval.empty_policy=ignore eval.hd95=true data.fold=1``.
        dataset: a raw dataset folder with labels, any supported layout (None: validation fold).
        fmt: its layout ("auto" detects it).
        out_csv: per-case CSV path (default :func:`default_eval_csv`).
        progress: progress bars on stderr (drawn only on a terminal).
        overlays: also draw every scored case and the summary grid into ``<CSV name>_overlays/``
            next to the CSV (as training draws ``overlays/``).
        case_sink: called per scored case as ``case_sink(case_id, truth, prediction)`` (canonical
            label maps of the prepared case, on the device), e.g. to keep them for choosing
            postprocessing; None: nothing kept.

    Returns:
        The :class:`EvalReport`; the CSV (and overlays) are written.

    Raises:
        CheckpointError, ConfigError: as :func:`load_model`.
        DataFormatError: missing or bad data, or an empty validation fold.
        OutputPathError: the CSV or its overlays folder would be, lie inside or hold the raw or
            prepared data scored, or be or hold the checkpoint; nothing is written.
    """
    loaded = load_model(checkpoint, overrides)
    cfg, tag = _scored_config(loaded.cfg, dataset, fmt)
    csv_path = Path(out_csv).expanduser() if out_csv is not None else default_eval_csv(loaded.checkpoint, tag)
    overlay_dir = csv_path.parent / f"{csv_path.stem}_overlays" if overlays else None
    # Before the cache is prepared: the CSV and overlays never land in what is scored.
    check_outputs(
        [("the per-case CSV", csv_path)] + ([("the overlays folder", overlay_dir)] if overlay_dir else []),
        folders=data_input_folders(cfg),
        files=[("the checkpoint", loaded.checkpoint)],
    )
    _speed_up_cuda(loaded.device)
    prepared, index = ensure_prepared(cfg, DistInfo(), progress=progress)
    case_ids, source = _scored_cases(cfg, list(index["cases"]), dataset)
    evaluator = build_evaluator(cfg, prepared, case_ids, loaded.device, progress=progress)
    evaluator.case_view = evaluator_case_view if overlays else None
    evaluator.case_sink = case_sink
    means, per_case = evaluator.score_model(loaded.model)
    keys = [k for k in per_case[0] if k != "case_id"]
    counts = {k: sum(1 for row in per_case if not math.isnan(row[k])) for k in keys}
    write_cases_csv(csv_path, per_case)
    if overlay_dir is not None:
        _write_eval_overlays(overlay_dir, evaluator.last_views, per_case, loaded)
    conventions = {PreparedCase(prepared, case_id).meta.get("label_convention") for case_id in case_ids}
    return EvalReport(
        means=means,
        counts=counts,
        per_case=per_case,
        csv_path=csv_path,
        source=source,
        empty_policy=build_eval_settings(cfg).empty_policy,
        loaded=loaded,
        overlays=overlay_dir,
        label_convention=conventions.pop() if len(conventions) == 1 else "mixed",
    )


def choose_for_checkpoint(
    checkpoint: Path,
    overrides: Sequence[str] = (),
    metric: str = pp.DEFAULT_METRIC,
    out_csv: Path | None = None,
    progress: bool = True,
    overlays: bool = True,
    memory_bytes: int = pp.DEFAULT_MEMORY_BYTES,
):
    """Evaluate a checkpoint on its validation fold (as :func:`evaluate_checkpoint`,
    CSV and overlays included), choose postprocessing on those predictions and write
    ``postprocessing.json`` into its run folder. The predictions wait in a :class:`postprocessing.PredictionStore`
    (a temporary folder inside the run folder beyond ``memory_bytes``, removed afterwards).

    Returns:
        (the EvalReport, the :class:`PostprocessingChoice`, the file written).

    Raises:
        PostprocessingError: an unknown metric (before anything runs); and what
            ``evaluate_checkpoint`` raises.
    """
    pp.check_metric(metric)
    run_dir = checkpoint_run_folder(checkpoint)
    with pp.PredictionStore(run_dir, memory_bytes) as store:
        report = evaluate_checkpoint(
            checkpoint, overrides, out_csv=out_csv, progress=progress, overlays=overlays, case_sink=store.put
        )
        settings = report.loaded.eval_settings.metric_settings(metric)
        choice = pp.choose_postprocessing(store, settings)
    path = pp.write_postprocessing(
        run_dir / pp.POSTPROCESSING_FILE, choice, report.loaded.checkpoint, report.source, settings
    )
    return report, choice, path
