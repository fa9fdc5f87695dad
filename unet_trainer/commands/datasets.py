"""The composition root's data half: where a config's data lives (the raw dataset, or the phantom it
generates into the cache; its prepared folder), its preparation when missing or stale, and its split.
Like :mod:`builders`, :mod:`resume` and :mod:`train`, it reads the resolved config; the commands get
folders, settings and case lists from it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..config import components
from ..core.distributed import DistInfo, barrier
from ..core.guard import check_outputs
from ..data.layouts import (
    CONVENTION_SCHEME,
    FORMAT_LABEL_CONVENTION,
    DataFormatError,
    list_cases,
    open_dataset,
    scheme_named,
)
from ..data.phantom import write_phantom_dataset
from ..data.prepare import PrepareSettings, load_prepared_index, prepare_dataset, prepared_is_current
from ..data.schemes import SCHEMES, LabelScheme
from ..data.split import kfold_split, load_split_file
from ..training.losses import OutputMode


def cache_dir(cfg: dict) -> Path:
    """``data.cache_dir``, else ``$UNET_TRAINER_CACHE``, else ``~/.cache/unet-trainer``."""
    if cfg["data"]["cache_dir"]:
        return Path(cfg["data"]["cache_dir"]).expanduser()
    env = os.environ.get("UNET_TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unet-trainer"


def raw_data_path(cfg: dict) -> Path:
    """The raw dataset folder ``data.path`` names (for ``data.path: null`` the phantom's folder in
    the cache), without checking or creating it."""
    data = cfg["data"]
    if data["path"] is not None:
        return Path(data["path"]).expanduser()
    phantom = data["phantom"]
    shape = "x".join(str(s) for s in phantom["shape"])
    return cache_dir(cfg) / f"phantom-{phantom['style']}-{phantom['cases']}cases-{shape}-seed{phantom['seed']}"


def raw_data_dir(cfg: dict, progress: bool = True) -> Path:
    """The raw dataset folder; for ``data.path: null`` the phantom, generated into the cache if absent.

    Raises:
        DataFormatError: ``data.path`` does not exist.
    """
    data = cfg["data"]
    folder = raw_data_path(cfg)
    if data["path"] is None:
        phantom = data["phantom"]
        if not (folder / "phantom.json").is_file():
            print(f"Generating the synthetic BraTS phantom into {folder}", file=sys.stderr)
            write_phantom_dataset(
                folder,
                phantom["cases"],
                tuple(phantom["shape"]),
                phantom["seed"],
                progress,
                workers=data["prepare_workers"],
                style=phantom["style"],
            )
        return folder
    if not folder.is_dir():
        raise DataFormatError(f"data.path: folder {folder} does not exist (set data.path=/path/to/your/BraTS)")
    return folder


def prepared_data_dir(cfg: dict, source: Path) -> Path:
    """``data.prepared_path``, else a cache folder named after the source and its absolute path."""
    if cfg["data"]["prepared_path"]:
        return Path(cfg["data"]["prepared_path"]).expanduser()
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return cache_dir(cfg) / "prepared" / f"{source.name}-{digest}"


def data_input_folders(cfg: dict) -> list[tuple[str, Path]]:
    """The dataset folders a run reads, as :func:`guard.check_outputs` takes them: the raw dataset
    and its prepared folder (neither checked nor created)."""
    raw = raw_data_path(cfg)
    return [("the raw dataset", raw), ("the prepared data folder", prepared_data_dir(cfg, raw))]


def check_run_outputs(cfg: dict, run_dir: Path, what: str = "the run folder (save_folder)") -> None:
    """Refuse a run (or cross-validation) folder that would lie in, be or hold the raw dataset or
    its prepared folder, and a prepared folder inside the raw dataset; before anything is written.

    Raises:
        OutputPathError: one line naming both paths.
    """
    raw, prepared = data_input_folders(cfg)
    check_outputs([(what, run_dir)], folders=[raw, prepared])
    check_outputs([(prepared[0], prepared[1])], folders=[raw])


def ensure_prepared(cfg: dict, dist_info: DistInfo, progress: bool = True) -> tuple[Path, dict]:
    """Prepare the dataset when the prepared copy is missing or stale (rank 0; others wait)."""
    source = raw_data_dir(cfg, progress) if dist_info.is_main else None
    barrier()
    if source is None:
        source = raw_data_dir(cfg, progress=False)
    out = prepared_data_dir(cfg, source)
    settings = build_prepare_settings(cfg)
    fmt = cfg["data"]["format"]
    scheme = cfg["data"]["scheme"]
    current = prepared_is_current(out, source, settings, fmt, list_cases=list_cases, scheme=scheme)
    if dist_info.is_main and not (current and _defined_scheme_is_current(out, source, settings)):
        print(f"Preparing {source} -> {out}", file=sys.stderr)
        dataset = open_dataset(source, fmt, scheme=scheme, dle_labels=settings.dle_labels)
        prepare_dataset(dataset, out, settings, workers=cfg["data"]["prepare_workers"], progress=progress)
    barrier()
    return out, load_prepared_index(out)


def _defined_scheme_is_current(out: Path, source: Path, settings: PrepareSettings) -> bool:
    """Whether the scheme a dataset.json defined when ``out`` was prepared is still the one it defines
    (a dataset.json edited since, say a region renamed, makes the preparation stale); True for every
    other scheme."""
    index = load_prepared_index(out)
    if not index.get("scheme_definition"):
        return True
    return index["scheme"] in open_dataset(source, index["format"], dle_labels=settings.dle_labels).schemes


def build_split(cfg: dict, case_ids: list[str]) -> dict[str, list[str]]:
    data = cfg["data"]
    if data["split_file"]:
        return load_split_file(Path(data["split_file"]), case_ids)
    try:
        return kfold_split(case_ids, data["num_folds"], data["fold"], data["split_seed"])
    except ValueError as exc:
        raise DataFormatError(f"data: {exc}") from None


def build_prepare_settings(cfg: dict) -> PrepareSettings:
    """How a case of the config's data is prepared (target spacing, DLE label numbering)."""
    return PrepareSettings.from_config(cfg["data"])


def with_dataset(cfg: dict, dataset: Path, fmt: str) -> dict:
    """A copy of ``cfg`` reading another raw dataset (its own prepared cache folder, keyed by its
    path, its own label scheme, and no split file); ``cfg`` stays as it was."""
    other = dict(path=str(Path(dataset).expanduser()), format=fmt, scheme="auto", prepared_path=None, split_file=None)
    return {**cfg, "data": {**cfg["data"], **other}}


def prepared_scheme(cfg: dict, index: dict) -> LabelScheme:
    """The label scheme of a prepared dataset (its ``prepare.json`` record ``index``); a record from
    before schemes were recorded holds its layout's scheme.

    Raises:
        DataFormatError: ``data.scheme`` names another scheme than the preparation's.
    """
    name = index.get("scheme") or CONVENTION_SCHEME[FORMAT_LABEL_CONVENTION[index["format"]]]
    requested = cfg["data"]["scheme"]
    if requested not in ("auto", name):
        raise DataFormatError(f"data.scheme {requested}: the prepared data ({index['source']}) holds scheme {name}")
    return scheme_named(name, index.get("scheme_definition"))


def with_scheme(cfg: dict, scheme: LabelScheme) -> tuple[dict, list[str]]:
    """A copy of ``cfg`` for data of ``scheme``: ``data.scheme`` names it, and the model takes its
    channels and gives one output per class (or per trained region, for a region loss). Returns the
    copy and a note for each model setting that changed.
    """
    ((name, settings),) = cfg["model"].items()
    region_mode = components.output_mode(cfg["loss"]) is OutputMode.REGIONS
    wanted = {"in_channels": len(scheme.channels), "num_classes": scheme.num_outputs(region_mode)}
    notes = [
        f"model.{name}.{key} {settings[key]} -> {value}: the data's label scheme {scheme.name} "
        + (
            f"has {value} input channel(s) ({', '.join(scheme.channels)})"
            if key == "in_channels"
            else f"needs {value} outputs ({', '.join(scheme.trained_regions if region_mode else ('background', *scheme.classes))})"
        )
        for key, value in wanted.items()
        if key in settings and settings[key] != value
    ]
    model = {name: {**settings, **{k: v for k, v in wanted.items() if k in settings}}}
    return {**named_scheme(cfg, scheme.name), "model": model}, notes


def requested_scheme(cfg: dict) -> str:
    """``data.scheme``: a scheme name, or "auto"."""
    return cfg["data"]["scheme"]


def named_scheme(cfg: dict, name: str) -> dict:
    """A copy of ``cfg`` whose ``data.scheme`` is ``name`` (a registered scheme), with the definition
    that rebuilds it where a dataset defined it (``data.scheme_definition``)."""
    definition = SCHEMES[name].definition or None
    return {**cfg, "data": {**cfg["data"], "scheme": name, "scheme_definition": definition}}


def scored_scheme(cfg: dict, index: dict, model: LabelScheme) -> dict:
    """``cfg`` naming the label scheme of the prepared data it scores (its ``index``), which must be
    compatible with ``model``, the scheme the model was trained on; the data's scheme decides the
    lesion-wise scoring.

    Raises:
        DataFormatError: the data's classes or channels are not the model's.
    """
    data = prepared_scheme(cfg, index)
    if not data.compatible_with(model):
        raise DataFormatError(
            f"{index['source']}: holds label scheme {data.name} ({', '.join(data.classes)}); the model was trained "
            f"on {model.name} ({', '.join(model.classes)}), whose channels or classes differ"
        )
    return named_scheme(cfg, data.name)
