"""One-time preparation of raw BraTS cases into memory-mappable arrays.

For every case: crop to the nonzero bounding box of all channels, resample to the target spacing
when the case's spacing differs, z-score each channel over its nonzero voxels, and store

    {case}_x.npy      float32 (C, Z, Y, X)   the normalised image (memory-mappable)
    {case}_y.npy      uint8   (Z, Y, X)      canonical labels (0 bg, 1 necrotic, 2 oedema, 3 enhancing)
    {case}_fg.npy     int32   (N, 4)         (label, z, y, x) of sampled tumour voxels, for oversampling
    {case}_meta.json  original shape/affine/spacing, crop box, label convention; written last

The ``_meta.json`` file is the case's completion marker and every file is written under a temporary
name and renamed, so an interrupted run never leaves a half-written case that could be read.
The settings are recorded in ``prepare.json``; cases prepared with other settings are redone.
The raw dataset comes opened (a :class:`RawDataset`, from ``data.layouts.open_dataset``), so
nothing here knows the layouts. Raw data is only ever read. One preparation at a time writes a folder (``prepare.lock``; a second
waits), and it first removes the temporaries an interrupted (killed) preparation left. Its worker
processes end with it, SIGKILL included (:func:`unet_trainer.core.workers.worker_pool`). A case that fails while being
written (a full disk) leaves none of its files; one that the target spacing would make larger than
``MAX_IMAGE_VALUES`` is refused before it is resampled.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.fileio import atomic_save_npy, atomic_write_text, remove_orphan_temporaries
from ..core.guard import check_outputs
from ..core.runfolder import PREPARE_LOCK_NAME, FolderLock
from ..core.workers import worker_pool
from .layouts.canonical import (
    CANONICAL_CHANNELS,
    LABEL_CONVENTIONS,
    MAX_IMAGE_VALUES,
    CaseFiles,
    DataFormatError,
    Layout,
    RawCase,
    RawDataset,
)
from .layouts.dle import DLE_LABEL_CONVENTIONS
from .schemes import SCHEMES

PREPARE_VERSION = 1
# Foreground voxels kept per label for oversampling: enough to cover a tumour, small on disk.
MAX_FOREGROUND_SAMPLES = 20_000


@dataclass(frozen=True)
class PrepareSettings:
    """What determines the prepared arrays; a change makes every case be prepared again."""

    target_spacing: tuple[float, float, float] | None = None  # (z, y, x) mm; None keeps each case's own
    dle_labels: str = DLE_LABEL_CONVENTIONS[0]  # label numbering of DLE arrays

    def as_dict(self) -> dict:
        return {
            "version": PREPARE_VERSION,
            "target_spacing": list(self.target_spacing) if self.target_spacing else None,
            "dle_labels": self.dle_labels,
        }

    @classmethod
    def from_config(cls, data_cfg: dict) -> PrepareSettings:
        """The settings from a resolved config's ``data`` section."""
        spacing = data_cfg.get("target_spacing")
        return cls(
            target_spacing=tuple(float(v) for v in spacing) if spacing else None,
            dle_labels=data_cfg.get("dle_labels", DLE_LABEL_CONVENTIONS[0]),
        )

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]


def nonzero_bounding_box(image: np.ndarray, label: np.ndarray | None = None) -> tuple[tuple[int, int], ...]:
    """Bounding box of voxels nonzero in any channel, or labelled (so no label is ever cut off).

    Args:
        image: (C, Z, Y, X).
        label: (Z, Y, X) or None.

    Returns:
        ((z0, z1), (y0, y1), (x0, x1)), half-open; the whole volume if every voxel is zero.
    """
    mask = np.any(image != 0, axis=0)
    if label is not None:
        mask |= label != 0
    if not mask.any():
        return tuple((0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Z-score each channel over its own nonzero voxels; zero (background) voxels stay 0.

    Args:
        image: float32 (C, Z, Y, X).

    Returns:
        A new float32 array of the same shape.
    """
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        mask = image[c] != 0
        if not mask.any():
            continue
        values = image[c][mask].astype(np.float64)
        std = values.std()
        out[c][mask] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, int, int] | None:
    """The (Z, Y, X) shape a volume of ``shape`` voxels of ``spacing`` mm gets at ``target`` mm,
    or None when the spacings already agree within 1% (no resampling)."""
    spacing = np.asarray(spacing, np.float64)
    target = np.asarray(target, np.float64)
    if np.allclose(spacing, target, rtol=0.01):
        return None
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(
    image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], target: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample to the target spacing: trilinear for the image, nearest for labels.

    Args:
        image: float32 (C, Z, Y, X); label: uint8 (Z, Y, X) or None; spacings in (z, y, x) mm.

    Returns:
        The resampled (image, label); unchanged when the spacings already agree within 1%.
    """
    size = resampled_shape(image.shape[1:], spacing, target)
    if size is None:
        return image, label
    img = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(image))[None], size=size, mode="trilinear", align_corners=False
    )[0].numpy()
    lab = None
    if label is not None:
        lab = (
            F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=size, mode="nearest-exact")[0, 0]
            .numpy()
            .astype(np.uint8)
        )
    return img, lab


def foreground_samples(
    label: np.ndarray, rng: np.random.Generator, max_per_label: int = MAX_FOREGROUND_SAMPLES
) -> np.ndarray:
    """Up to ``max_per_label`` random voxel coordinates of each tumour label.

    Returns:
        int32 (N, 4) rows of (label, z, y, x); empty (0, 4) when the case has no tumour.
    """
    rows = []
    for value in np.unique(label):
        if value == 0:
            continue
        coords = np.argwhere(label == value)
        if len(coords) > max_per_label:
            coords = coords[rng.choice(len(coords), max_per_label, replace=False)]
        rows.append(np.concatenate([np.full((len(coords), 1), value), coords], axis=1))
    if not rows:
        return np.zeros((0, 4), np.int32)
    return np.concatenate(rows).astype(np.int32)


def check_resampled_size(case_id: str, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> None:
    """Refuse, before resampling, a case that the target spacing would make larger than
    :data:`MAX_IMAGE_VALUES` values.

    Args:
        shape: the cropped image's (C, Z, Y, X); spacings in (z, y, x) mm.

    Raises:
        DataFormatError: one line naming the case, both spacings and the resulting shape.
    """
    size = resampled_shape(shape[1:], spacing, target)
    if size is None:
        return
    values = int(np.prod(size, dtype=object)) * int(shape[0])
    if values > MAX_IMAGE_VALUES:
        mm = ", ".join(f"{v:g}" for v in target)
        raise DataFormatError(
            f"case {case_id}: resampling its {tuple(shape[1:])} voxels of ({', '.join(f'{v:g}' for v in spacing)}) "
            f"mm to the target spacing ({mm}) mm gives shape {size} x {shape[0]} channels ({values:,} values); "
            f"accepted: at most {MAX_IMAGE_VALUES:,} values per image: choose a coarser data.target_spacing "
            "(--target-spacing), in mm"
        )


def prepare_case(raw: RawCase, settings: PrepareSettings) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, resample and normalise one case in memory.

    Returns:
        (image float32 (C, Z', Y', X'), label uint8 (Z', Y', X') or None, metadata dict).

    Raises:
        DataFormatError: the target spacing would make the case too large (checked before resampling).
    """
    image, label = raw.image, raw.label
    original_shape = list(image.shape[1:])
    box = nonzero_bounding_box(image, label)
    crop = tuple(slice(a, b) for a, b in box)
    image = image[(slice(None),) + crop]
    label = label[crop] if label is not None else None
    spacing = list(raw.spacing)
    if settings.target_spacing is not None:
        check_resampled_size(raw.case_id, image.shape, raw.spacing, settings.target_spacing)
        image, label = resample(image, label, raw.spacing, settings.target_spacing)
        spacing = list(settings.target_spacing)
    if not raw.preprocessed:
        image = zscore_nonzero(image)
    meta = {
        "case_id": raw.case_id,
        "original_shape": original_shape,  # (Z, Y, X) of the raw array
        "original_spacing": list(raw.spacing),  # (z, y, x) mm
        "spacing": spacing,  # after resampling
        "crop_box": [list(b) for b in box],  # half-open (Z, Y, X) ranges in the raw array
        "affine": np.asarray(raw.affine).tolist(),  # NIfTI affine of the raw (x, y, z) grid
        "label_convention": raw.label_convention,
        "prepared_shape": list(image.shape[1:]),
        "has_label": label is not None,
        # Tumour voxels after cropping and resampling (None without a label): a dataset where every
        # case has none is almost surely read from the wrong label files.
        "foreground_voxels": int(np.count_nonzero(label)) if label is not None else None,
    }
    return image.astype(np.float32, copy=False), label, meta


def _case_is_done(out: Path, case_id: str, digest: str, conventions: set[str] | None = None) -> bool:
    """Whether the case is prepared with these settings (``digest``) and, where ``conventions`` is
    given, read in one of them (a dataset.json that defines another scheme since makes it stale)."""
    meta_path = out / f"{case_id}_meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if conventions is not None and meta.get("label_convention") not in conventions:
        return False
    return meta.get("settings_digest") == digest and (out / f"{case_id}_x.npy").is_file()


def zero_channel_warning(
    case: CaseFiles, image: np.ndarray, channels: tuple[str, ...] = CANONICAL_CHANNELS
) -> str | None:
    """A warning naming the case and its modalities that hold nothing but zeros (a missing or
    blank modality, almost surely a conversion mistake), or None.

    Args:
        image: the raw (C, Z, Y, X) image; only the modalities are looked at (DLE's extra one-hot
            channel is empty for a case without tumour).
        channels: the names of the image's modalities, in order (the layout's channels).
    """
    modalities = min(image.shape[0], len(channels))
    zero = [c for c in range(modalities) if not np.any(image[c])]
    if not zero:
        return None
    source = case.images[zero[0]] if len(case.images) == image.shape[0] else case.images[0]
    if len(zero) == modalities:
        return f"case {case.case_id}: every channel is all zeros ({source.parent}); it carries no image to learn from"
    which = ", ".join(f"{channels[c]} (channel {c})" for c in zero)
    return f"case {case.case_id}: {which} {'is' if len(zero) == 1 else 'are'} all zeros ({source}); check the file"


def _prepare_one(
    args: tuple[CaseFiles, str, PrepareSettings, Layout, tuple[str, ...]],
) -> tuple[str, str | None, str | None]:
    """Worker: prepare and write one case read in ``layout``, its labels in the widest of the label
    schemes given; returns (case_id, error message or None, warning or None)."""
    case, out_dir, settings, layout, schemes = args
    out = Path(out_dir)
    try:
        raw = layout.read_case(case, settings.dle_labels, schemes)
    except DataFormatError as exc:
        return case.case_id, str(exc), None
    warning = zero_channel_warning(case, raw.image, SCHEMES[schemes[0]].channels if schemes else layout.channels)
    image, label, meta = prepare_case(raw, settings)
    meta["settings_digest"] = settings.digest()
    arrays = {"x": image}
    if label is not None:
        # str hash() is salted per process; a digest keeps the sampled voxels reproducible.
        rng = np.random.default_rng(int(hashlib.sha1(case.case_id.encode()).hexdigest()[:8], 16))
        arrays.update(y=label.astype(np.uint8), fg=foreground_samples(label, rng))
    meta_path = out / f"{case.case_id}_meta.json"
    # A metadata file of earlier settings would vouch for the new arrays as its own once they
    # replace the old ones: the case is marked incomplete before any of them is written.
    meta_path.unlink(missing_ok=True)
    written = []
    try:
        for suffix, array in arrays.items():
            path = out / f"{case.case_id}_{suffix}.npy"
            atomic_save_npy(path, array)
            written.append(path)
        # The metadata goes last: its presence means the case is complete.
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    except BaseException:
        # E.g. a full disk: no file of a half-written case stays to take the space.
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return case.case_id, None, warning


def prepare_dataset(
    dataset: RawDataset,
    out: Path,
    settings: PrepareSettings = PrepareSettings(),
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Prepare every case of a raw dataset into ``out`` (resumable, atomic per case).

    Args:
        dataset: the raw dataset (``data.layouts.open_dataset``); its folder is never modified. With
            ``dataset.skip_bad``, a case that fails validation when read is skipped and listed, like
            the cases its listing set aside, instead of stopping.
        out: the prepared folder (created).
        settings: preparation settings; cases prepared with other settings are redone.
        workers: processes working in parallel.
        progress: show a progress bar on stderr when it is a terminal (never in logs or pipes,
            where it would bury the one-line error).

    Returns:
        The ``prepare.json`` record: source, format, label scheme, settings, case ids and skipped cases.

    Raises:
        DataFormatError: the first bad case (one line naming case and file) unless ``dataset.skip_bad``;
            also a folder where every case is bad.
        OutputPathError: ``out`` is, lies inside or holds the dataset's folder (nothing is written).
        ValueError: ``settings.dle_labels`` is not one of the layout's label choices.
    """
    out = Path(out)
    check_outputs([("the prepared folder", out)], folders=[("the raw dataset", dataset.root)])
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, PREPARE_LOCK_NAME).acquire(
        wait=True, on_wait=lambda holder: print(f"waiting for {holder}, which is preparing {out}", file=sys.stderr)
    )
    try:
        # Under the lock no other preparation writes here: every temporary is a killed one's orphan.
        remove_orphan_temporaries(out)
        return _prepare_cases(dataset, out, settings, workers, progress)
    finally:
        lock.release()


def _prepare_cases(dataset: RawDataset, out: Path, settings: PrepareSettings, workers: int, progress: bool) -> dict:
    """:func:`prepare_dataset` once the folder is locked."""
    source, cases = dataset.root, dataset.cases
    # Cases whose files are missing or ambiguous were set aside while listing (with skip_bad); the
    # cases that fail when read join them.
    errors = dict(dataset.skipped)
    digest = settings.digest()
    known = set(dataset.layout.scheme_conventions(settings.dle_labels, cases).values()) if cases else None
    todo = [c for c in cases if not _case_is_done(out, c.case_id, digest, known)]
    jobs = [(c, str(out), settings, dataset.layout, dataset.schemes) for c in todo]
    # disable=None: tqdm draws only on a terminal.
    bar = tqdm(
        total=len(cases),
        initial=len(cases) - len(todo),
        desc="prepare",
        unit="case",
        disable=None if progress else True,
    )
    try:
        _run_jobs(jobs, workers, bar, dataset.skip_bad, errors)
    finally:
        bar.close()
    good = [c.case_id for c in cases if c.case_id not in errors]
    errors = dict(sorted(errors.items()))
    if not good:
        raise DataFormatError(f"{source}: every case failed validation; first: {next(iter(errors.values()))}")
    scheme = choose_scheme(dataset, settings.dle_labels, {_case_convention(out, case_id) for case_id in good})
    record = {
        "source": str(source.resolve()),
        "format": dataset.format,
        "scheme": scheme,
        # A scheme the dataset's own files define (nnU-Net v2's dataset.json), to rebuild it without them.
        "scheme_definition": SCHEMES[scheme].definition or None,
        "settings": settings.as_dict(),
        "settings_digest": digest,
        "cases": good,
        "skipped": errors,
    }
    atomic_write_text(out / "prepare.json", json.dumps(record, indent=1))
    _print_warning(no_tumour_warning(source, out, good))
    return record


def _case_convention(out: Path, case_id: str) -> str:
    return json.loads((out / f"{case_id}_meta.json").read_text())["label_convention"]


def choose_scheme(dataset: RawDataset, dle_labels: str, conventions: set[str]) -> str:
    """The narrowest of the dataset's candidate schemes whose label convention holds the labels
    of every case (each case's ``conventions``: the narrowest that held its own labels).

    Raises:
        DataFormatError: no candidate holds them all (cases prepared under another scheme).
    """
    known = dataset.layout.scheme_conventions(dle_labels, dataset.cases)
    needed = set().union(*(LABEL_CONVENTIONS[c].values() for c in conventions))
    for scheme in dataset.schemes or tuple(known):
        if needed <= set(LABEL_CONVENTIONS[known[scheme]].values()):
            return scheme
    raise DataFormatError(
        f"{dataset.root}: the cases' labels ({', '.join(sorted(conventions))} numbering) do not fit the label "
        f"scheme {', '.join(dataset.schemes)}; choose another data.scheme, or auto"
    )


def _run_jobs(jobs: list[tuple], workers: int, bar, skip_bad: bool, errors: dict[str, str]) -> None:
    """Prepare the cases of ``jobs`` (:func:`_prepare_one`'s arguments) in ``workers`` processes, or in
    this one, collecting them as :func:`_collect` does."""
    if workers > 1 and len(jobs) > 1:
        with worker_pool(workers) as pool:
            try:
                _collect(pool.map(_prepare_one, jobs), bar, skip_bad, errors)
            except BaseException:
                # Stop now rather than after every queued case has been prepared (a bad case,
                # a full disk, Ctrl-C); the cases being written are finished.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    else:
        _collect(map(_prepare_one, jobs), bar, skip_bad, errors)


def _collect(results, bar, skip_bad: bool, errors: dict[str, str]) -> None:
    """Take the (case id, error, warning) of each prepared case as it comes: the bar advances, a
    warning is printed, and a bad case stops it (DataFormatError) or, with ``skip_bad``, goes into
    ``errors``."""
    for case_id, error, warning in results:
        bar.update()
        _print_warning(warning)
        if error:
            if not skip_bad:
                raise DataFormatError(error)
            errors[case_id] = error


def _print_warning(warning: str | None) -> None:
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def no_tumour_warning(source: Path, out: Path, case_ids: Sequence[str]) -> str | None:
    """A warning when every labelled case of a preparation has an empty segmentation (background
    only): almost surely the wrong label files or layout, and nothing a model could learn. None
    when some case has tumour, or no case a label (cases prepared before their metadata counted
    tumour voxels count as unknown, so as not empty).

    Args:
        source: the raw dataset folder (named in the warning).
        out: the prepared folder holding ``{case}_meta.json`` for every id of ``case_ids``.
    """
    labelled = empty = 0
    for case_id in case_ids:
        try:
            voxels = json.loads((out / f"{case_id}_meta.json").read_text()).get("foreground_voxels")
        except (OSError, ValueError):
            continue
        if isinstance(voxels, int):
            labelled += 1
            empty += voxels == 0
    if not labelled or empty < labelled:
        return None
    return (
        f"{source}: the segmentations of all {labelled} labelled cases are empty (background only), so a model "
        "learns nothing from them; check that the label files are the right ones and the layout (data.format, "
        "--format) is the dataset's"
    )


def prepared_is_current(
    out: Path,
    source: Path,
    settings: PrepareSettings,
    fmt: str = "auto",
    *,
    list_cases: Callable[..., list[CaseFiles]],
    scheme: str = "auto",
) -> bool:
    """True when ``out`` holds a complete preparation of ``source`` with ``settings``.

    A forced ``fmt`` (not "auto") must also be the layout the preparation read, so that forcing
    a layout the folder does not hold fails instead of reusing an earlier preparation; a forced
    label ``scheme`` likewise.

    Args:
        list_cases: the registry's ``data.layouts.list_cases``; the raw folder is listed (no file
            read) in the layout the preparation recorded, and only when its record matches.
    """
    record_path = Path(out) / "prepare.json"
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if record.get("settings_digest") != settings.digest() or record.get("source") != str(Path(source).resolve()):
        return False
    if fmt != "auto" and record.get("format") != fmt:
        return False
    # A record without a scheme predates schemes: its cases are kept, the scheme is chosen again.
    if "scheme" not in record or (scheme != "auto" and record["scheme"] != scheme):
        return False
    # Cases added to or removed from the raw folder since make the preparation stale too
    # (a listing, no file is read); cases skipped as bad count as known.
    listed = {case.case_id for case in list_cases(Path(source), record.get("format", fmt), bad={})}
    if listed - set(record.get("skipped", {})) != set(record["cases"]):
        return False
    return all(_case_is_done(Path(out), case_id, settings.digest()) for case_id in record["cases"])


def load_prepared_index(out: Path) -> dict:
    """Read ``prepare.json`` of a prepared folder.

    Raises:
        DataFormatError: the folder holds no complete preparation.
    """
    record_path = Path(out) / "prepare.json"
    if not record_path.is_file():
        raise DataFormatError(f"{out}: not a prepared dataset (no prepare.json); run `unet-data prepare`")
    return json.loads(record_path.read_text())
