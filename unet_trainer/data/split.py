"""Cross-validation splits: scikit-learn's KFold over the sorted case ids, or an explicit file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sklearn.model_selection import KFold

from ..core.documents import DocumentError, load_json_text, read_utf8
from ..core.fileio import os_error_line
from .layouts.canonical import DataFormatError


def kfold_split(case_ids: Sequence[str], num_folds: int, fold: int, split_seed: int) -> dict[str, list[str]]:
    """Fold ``fold`` of ``KFold(n_splits=num_folds, shuffle=True, random_state=split_seed)``.

    The ids are sorted first, so the split depends only on the set of cases and the seed (with 484
    MSD cases, seed 0 and fold 0 this is Composer's 387 train / 97 validation split).

    Returns:
        {"train": [...], "val": [...]}, each sorted.

    Raises:
        ValueError: fewer cases than folds, or a fold outside [0, num_folds).
    """
    ids = sorted(case_ids)
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold {fold} is outside 0..{num_folds - 1}")
    if len(ids) < num_folds:
        raise ValueError(f"{len(ids)} cases cannot be split into {num_folds} folds")
    splitter = KFold(n_splits=num_folds, shuffle=True, random_state=split_seed)
    train_idx, val_idx = list(splitter.split(ids))[fold]
    return {"train": sorted(ids[i] for i in train_idx), "val": sorted(ids[i] for i in val_idx)}


def load_split_file(path: Path, available: Sequence[str]) -> dict[str, list[str]]:
    """Read an explicit split ``{"train": [...], "val": [...]}`` and check every id exists.

    An id repeated in "train" is drawn that many times per epoch (oversampling it). A validation
    id may appear once only, and never in "train" too: a repeat would count twice in the mean
    Dice, and a training case scored as validation would flatter it.

    Raises:
        DataFormatError: unreadable file, missing keys, ids absent from the prepared data, a
            repeated validation id, or an id in both lists.
    """
    path = Path(path)
    try:
        split = load_json_text(read_utf8(path))
    except OSError as exc:
        raise DataFormatError(f"{os_error_line(exc, path)}; cannot read the split file") from None
    except (DocumentError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read the split file ({exc})") from None
    if (
        not isinstance(split, dict)
        or not isinstance(split.get("train"), list)
        or not isinstance(split.get("val"), list)
    ):
        raise DataFormatError(f'{path}: a split file must be {{"train": [ids...], "val": [ids...]}}')
    known = set(available)
    missing = [i for i in split["train"] + split["val"] if i not in known]
    if missing:
        raise DataFormatError(f"{path}: {len(missing)} case ids are not in the dataset, e.g. {missing[0]!r}")
    repeated = sorted({i for i in split["val"] if split["val"].count(i) > 1})
    if repeated:
        raise DataFormatError(f'{path}: "val" lists {repeated[0]!r} more than once; each validation case counts once')
    leaked = sorted(set(split["val"]) & set(split["train"]))
    if leaked:
        raise DataFormatError(f'{path}: {len(leaked)} case ids are in both "train" and "val", e.g. {leaked[0]!r}')
    return {"train": list(split["train"]), "val": list(split["val"])}
