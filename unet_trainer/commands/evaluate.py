"""Scoring a loaded model, or a folder of predictions: the logic behind ``unet-eval`` and the fold scores of
``unet-cv``.

Plain-argument functions; the command-line parsing lives in :mod:`unet_trainer.cli`, which loads the
model (:func:`loading.load_model`: a checkpoint's model rebuilt from the config stored in it, with
command-line overrides such as ``eval.mirror_tta=true device=cpu precision=fp32``) and hands it here.

* :func:`evaluate_model` scores it on the validation fold of its own config, or on every labelled case
  of another raw dataset, through the same prepared cache and evaluator as training;
* :func:`choose_postprocessing_for` (``unet-eval --choose-postprocessing``) also chooses the run's
  postprocessing on those predictions;
* :func:`evaluate_folder` (``unet-eval --predictions DIR --dataset DATA``) scores a folder of label
  NIfTIs from any tool against a raw dataset's ground truth, with the same metrics, table and CSV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from ..core.checkpoints import checkpoint_run_folder
from ..core.distributed import DistInfo
from ..core.guard import check_outputs
from ..data.layouts import DataFormatError, dataset_scheme, open_dataset
from ..data.layouts.files import PROBABILITIES_SUFFIX, is_hidden, read_prediction_of, strip_nifti_extension
from ..data.loader import PreparedCase
from ..data.schemes import DEFAULT_SCHEME
from ..evaluation import postprocessing as pp
from ..evaluation.evaluation import write_cases_csv
from ..evaluation.inference import speed_up_inference
from ..evaluation.lesion_metrics import DEFAULT_LESION_DEFINITION
from ..evaluation.metrics import mean_scores
from ..evaluation.visualize import evaluator_case_view, write_overlays
from .builders import build_eval_settings, build_evaluator, build_scheme, build_scoring, build_split_settings
from .datasets import (
    build_prepare_settings,
    build_split,
    data_input_folders,
    ensure_prepared,
    named_scheme,
    requested_scheme,
    scored_scheme,
    with_dataset,
)


class ScoredModel(Protocol):
    """What scoring needs of a checkpoint's model (:class:`loading.LoadedModel` has it): the module in
    evaluation mode on its device, the resolved config it was rebuilt from, and where it came from."""

    model: torch.nn.Module
    cfg: dict
    device: torch.device
    checkpoint: Path
    weights: str
    timestamp: dict


@dataclass
class EvalReport:
    """What :func:`evaluate_model` measured.

    Attributes:
        means: mean over cases of every score key (NaNs left out); Dice keys NCR, ED, EN, WT, TC,
            ET, mean; with HD95 also hd95/WT, hd95/TC, hd95/ET; lesion-wise also lesion_dice/WT ...
            and lesion_hd95/WT ....
        counts: per key, how many cases entered its mean.
        per_case: one row per case: {"case_id", score keys...}.
        csv_path: where the per-case rows were written.
        source: what was scored, in words.
        empty_policy: the empty-ground-truth policy used.
        loaded: the model that was scored (None for a folder of predictions).
        overlays: the folder of the overlay PNGs (one per case and summary.png), or None.
        label_convention: the scored cases' own label convention (a key of ``LABEL_CONVENTIONS``;
            "mixed" when they differ), so labels can be named by the values the user's files hold.
        predictions: the folder of predictions that was scored (None for a model).
        scheme: the label scheme scored (a key of ``data.schemes.SCHEMES``).
        lesion_definition: the metric definition of the HD95 and lesion-wise scores (a key of
            ``LESION_DEFINITIONS``).
    """

    means: dict[str, float]
    counts: dict[str, int]
    per_case: list[dict]
    csv_path: Path
    source: str
    empty_policy: str
    loaded: ScoredModel | None
    overlays: Path | None = None
    label_convention: str = "mixed"
    predictions: Path | None = None
    scheme: str = DEFAULT_SCHEME
    lesion_definition: str = DEFAULT_LESION_DEFINITION


def default_eval_csv(checkpoint: Path, tag: str) -> Path:
    """``<run folder>/eval_<checkpoint name>_<tag>.csv``: the run folder is the parent of the
    ``checkpoints/`` folder holding the checkpoint (else the checkpoint's own folder)."""
    folder = checkpoint_run_folder(checkpoint)
    safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    return folder / f"eval_{checkpoint.stem}_{safe_tag}.csv"


def _scored_config(cfg: dict, dataset: Path | None, fmt: str) -> tuple[dict, str]:
    """The config whose data :func:`evaluate_model` scores, and the tag of its default CSV name:
    ``cfg`` itself and "val-fold<k>" (or "val" for a split file) without ``dataset``; with it, a copy
    reading that dataset (its own prepared cache folder, keyed by its path) and the dataset's name."""
    if dataset is None:
        return cfg, build_split_settings(cfg).tag
    # A new config: the loaded model's stays as it was.
    return with_dataset(cfg, dataset, fmt), Path(dataset).expanduser().resolve().name


def _scored_cases(cfg: dict, prepared_ids: list[str], dataset: Path | None) -> tuple[list[str], str]:
    """The case ids :func:`evaluate_model` scores (every prepared case of ``dataset``, else the
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


def _write_eval_overlays(overlay_dir: Path, views: dict, per_case: list[dict], loaded: ScoredModel) -> None:
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


def evaluate_model(
    loaded: ScoredModel,
    dataset: Path | None = None,
    fmt: str = "auto",
    out_csv: Path | None = None,
    progress: bool = True,
    overlays: bool = True,
    case_sink=None,
) -> EvalReport:
    """Score a checkpoint's model: Dice per label and region (and HD95 with ``eval.hd95=true``).

    Without ``dataset``: the validation fold of the checkpoint's own config (its data, split and
    preparation, exactly as training evaluated). With ``dataset``: every labelled case of that raw
    folder, prepared through the cache like training data. Scoring runs on the prepared (cropped)
    volumes, as during training; outside the crop both prediction and truth are background, so
    Dice and HD95 equal their values on the raw grid.

    Args:
        loaded: the model of a ``unet-train`` checkpoint (:func:`loading.load_model`, whose overrides,
            e.g. ``eval.empty_policy=ignore eval.hd95=true data.fold=1``, are in its config).
        dataset: a raw dataset folder with labels, any supported layout (None: validation fold).
        fmt: its layout ("auto" detects it).
        out_csv: per-case CSV path (default :func:`default_eval_csv`).
        progress: progress bars on stderr (drawn only on a terminal).
        overlays: also draw every scored case and the summary grid into ``<CSV name>_overlays/``
            next to the CSV (as training draws ``overlays/``).
        case_sink: called per scored case as ``case_sink(case_id, truth, prediction, spacing)`` (class-index
            label maps of the prepared case, on the device), e.g. to keep them for choosing
            postprocessing; None: nothing kept.

    Returns:
        The :class:`EvalReport`; the CSV (and overlays) are written.

    Raises:
        DataFormatError: missing or bad data, or an empty validation fold.
        OutputPathError: the CSV or its overlays folder would be, lie inside or hold the raw or
            prepared data scored, or be or hold the checkpoint; nothing is written.
    """
    cfg, tag = _scored_config(loaded.cfg, dataset, fmt)
    csv_path = Path(out_csv).expanduser() if out_csv is not None else default_eval_csv(loaded.checkpoint, tag)
    overlay_dir = csv_path.parent / f"{csv_path.stem}_overlays" if overlays else None
    # Before the cache is prepared: the CSV and overlays never land in what is scored.
    check_outputs(
        [("the per-case CSV", csv_path)] + ([("the overlays folder", overlay_dir)] if overlay_dir else []),
        folders=data_input_folders(cfg),
        files=[("the checkpoint", loaded.checkpoint)],
    )
    speed_up_inference(loaded.device)
    prepared, index = ensure_prepared(cfg, DistInfo(), progress=progress)
    cfg = scored_scheme(cfg, index, build_scheme(loaded.cfg))
    case_ids, source = _scored_cases(cfg, list(index["cases"]), dataset)
    evaluator = build_evaluator(cfg, prepared, case_ids, loaded.device, progress=progress)
    evaluator.case_view = evaluator_case_view if overlays else None
    evaluator.case_sink = case_sink
    means, per_case = evaluator.score_model(loaded.model)
    counts = _counts(per_case)
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
        scheme=build_scheme(cfg).name,
        lesion_definition=build_eval_settings(cfg).lesion.definition,
    )


def choose_postprocessing_for(
    loaded: ScoredModel,
    metric: str = pp.DEFAULT_METRIC,
    out_csv: Path | None = None,
    progress: bool = True,
    overlays: bool = True,
    memory_bytes: int = pp.DEFAULT_MEMORY_BYTES,
):
    """Evaluate a checkpoint's model on its validation fold (as :func:`evaluate_model`, CSV and
    overlays included), choose postprocessing on those predictions and write
    ``postprocessing.json`` into its run folder. The predictions wait in a :class:`postprocessing.PredictionStore`
    (a temporary folder inside the run folder beyond ``memory_bytes``, removed afterwards).

    Returns:
        (the EvalReport, the :class:`PostprocessingChoice`, the file written).

    Raises:
        PostprocessingError: an unknown metric (before anything runs); and what
            :func:`evaluate_model` raises.
    """
    pp.check_metric(metric)
    run_dir = checkpoint_run_folder(loaded.checkpoint)
    with pp.PredictionStore(run_dir, memory_bytes) as store:
        report = evaluate_model(loaded, out_csv=out_csv, progress=progress, overlays=overlays, case_sink=store.put)
        settings = build_eval_settings(loaded.cfg).metric_settings(metric)
        choice = pp.choose_postprocessing(store, settings)
    path = pp.write_postprocessing(run_dir / pp.POSTPROCESSING_FILE, choice, loaded.checkpoint, report.source, settings)
    return report, choice, path


def _counts(per_case: list[dict]) -> dict[str, int]:
    """Per score key, how many cases have a number (not NaN) for it."""
    keys = [k for k in per_case[0] if k != "case_id"]
    return {k: sum(1 for row in per_case if not math.isnan(row[k])) for k in keys}


def _some(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def prediction_files(predictions: Path, case_ids: Sequence[str], dataset: Path) -> dict[str, Path]:
    """Each case's prediction in the folder ``predictions``: ``<case id>.nii.gz`` (or ``.nii``).
    ``<case id>_probabilities.nii.gz`` files, hidden files and files that are no NIfTI are passed over.

    Raises:
        DataFormatError: (one line) no such folder; a case without its prediction; a NIfTI that matches
            no case of ``dataset``; a case with both a ``.nii`` and a ``.nii.gz``.
    """
    if not predictions.is_dir():
        raise DataFormatError(f"{predictions}: no such folder; expected the folder of predictions to score")
    wanted = set(case_ids)
    found: dict[str, list[Path]] = {}
    extra = []
    for path in sorted(predictions.iterdir()):
        stem = strip_nifti_extension(path.name)
        if stem is None or is_hidden(path.name) or not path.is_file():
            continue
        if stem in wanted:
            found.setdefault(stem, []).append(path)
        elif not (stem.endswith(PROBABILITIES_SUFFIX) and stem.removesuffix(PROBABILITIES_SUFFIX) in wanted):
            extra.append(path.name)
    missing = [case_id for case_id in case_ids if case_id not in found]
    if missing:
        raise DataFormatError(
            f"{predictions}: no prediction for {_some(missing)} ({len(missing)} of the {len(case_ids)} labelled "
            f"cases of {dataset}); expected <case id>.nii.gz for each"
        )
    if extra:
        raise DataFormatError(
            f"{predictions}: {_some(extra)} match no case of {dataset}; expected <case id>.nii.gz for its cases only"
        )
    twice = [case_id for case_id, paths in found.items() if len(paths) > 1]
    if twice:
        raise DataFormatError(f"{predictions}: case {twice[0]} has both a .nii and a .nii.gz prediction; keep one")
    return {case_id: found[case_id][0] for case_id in case_ids}


def evaluate_folder(
    predictions: Path,
    dataset: Path,
    cfg: dict,
    fmt: str = "auto",
    out_csv: Path | None = None,
    progress: bool = True,
) -> EvalReport:
    """Score a folder of label maps from any tool against a raw dataset's ground truth, case by case
    on the raw grid, with the metrics ``cfg`` asks for (``eval.*``: the same table and CSV as
    :func:`evaluate_model`; on predictions ``unet-predict`` wrote, the same numbers).

    Args:
        predictions: a folder of ``<case id>.nii.gz`` label maps in the dataset's own label convention,
            on each case's grid (as ``unet-predict`` writes them).
        dataset: the raw dataset with labels, any supported layout.
        cfg: a resolved config: its ``eval`` settings, ``device`` and ``data.dle_labels``.
        fmt: the dataset's layout ("auto" detects it).
        out_csv: per-case CSV path (default ``<predictions>/eval_<dataset name>.csv``).
        progress: a progress bar on stderr (drawn only on a terminal).

    Raises:
        DataFormatError: a bad dataset, a missing or extra prediction, a prediction on another grid or
            with a value that is no label (one line naming the file).
        OutputPathError: the CSV would be, lie inside or hold the dataset; nothing is written.
    """
    predictions, dataset = Path(predictions).expanduser(), Path(dataset).expanduser()
    dle_labels = build_prepare_settings(cfg).dle_labels
    opened = open_dataset(dataset, fmt, require_labels=True, scheme=requested_scheme(cfg), dle_labels=dle_labels)
    cases = opened.cases
    paths = prediction_files(predictions, [case.case_id for case in cases], dataset)
    csv_path = Path(out_csv).expanduser() if out_csv is not None else predictions / f"eval_{dataset.resolve().name}.csv"
    check_outputs([("the per-case CSV", csv_path)], folders=[("the raw dataset", dataset)])
    scheme = dataset_scheme(opened, dle_labels)
    cfg = named_scheme(cfg, scheme)  # scored in the dataset's own scheme
    device, metrics = build_scoring(cfg)
    per_case, conventions = [], set()
    for case in tqdm(cases, desc="evaluate", unit="case", disable=None if progress else True):
        raw = opened.layout.read_case(case, dle_labels, (scheme,))
        prediction = torch.from_numpy(read_prediction_of(case, raw, paths[case.case_id])).to(device)
        truth = torch.from_numpy(raw.label).to(device)
        row = {"case_id": case.case_id}
        for metric in metrics:
            row.update(metric(prediction, truth, raw.spacing))
        per_case.append(row)
        conventions.add(raw.label_convention)
    write_cases_csv(csv_path, per_case)
    return EvalReport(
        means=mean_scores([{k: v for k, v in row.items() if k != "case_id"} for row in per_case]),
        counts=_counts(per_case),
        per_case=per_case,
        csv_path=csv_path,
        source=f"all {len(cases)} labelled cases of {dataset}",
        empty_policy=build_eval_settings(cfg).empty_policy,
        loaded=None,
        label_convention=conventions.pop() if len(conventions) == 1 else "mixed",
        predictions=predictions,
        scheme=scheme,
        lesion_definition=build_eval_settings(cfg).lesion.definition,
    )
