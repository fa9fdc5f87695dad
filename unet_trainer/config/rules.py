"""Cross-key rules of a resolved config: what a single field cannot say (the fold below the number
of folds, a patch the model takes, a transform's range in order, SGD's Nesterov with momentum...).
"""

from __future__ import annotations

from ..models.base import SegmentationModel
from ..models.checks import ModelArgumentError
from ..training.augment import AUGMENTATIONS
from ..training.batch_transform import SettingError
from . import components
from .engine import ConfigError


def check_run_name(name: str) -> None:
    """``run_name`` names one folder (in ``save_folder``'s default ``runs/{run_name}``), so it must
    be a plain name: a separator or ``..`` would put the run's files elsewhere.

    Raises:
        ConfigError: no name, ``.`` or ``..``, or a path separator in it.
    """
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ConfigError(
            f"'run_name' = {name!r} must be a plain folder name (not empty, '.' or '..', no '/' or '\\'); "
            "to put the run elsewhere set save_folder=PATH"
        )


def _model_to_check(section: dict) -> SegmentationModel:
    """The model the section names, built on the meta device, so the checks can ask it.

    Raises:
        ConfigError: the model rejects its settings (the setting's path named).
    """
    ((name, _),) = section.items()
    try:
        return components.describe_model(section)
    except ModelArgumentError as exc:
        raise ConfigError(exc.at(f"model.{name}.{exc.argument}")) from None
    except ValueError as exc:
        raise ConfigError(f"'model.{name}': {exc}") from None


def check_consistency(cfg: dict) -> None:
    """Cross-key rules that a single field cannot express."""
    data = cfg["data"]
    if data["fold"] >= data["num_folds"]:
        raise ConfigError(f"'data.fold' = {data['fold']} must be below 'data.num_folds' = {data['num_folds']}")
    if "dice" not in cfg["eval"]["metrics"]:
        # The best checkpoint, early stopping, the progress plot and unet-cv's summary follow the mean Dice.
        raise ConfigError(
            f"'eval.metrics' = {cfg['eval']['metrics']} must name dice: the best checkpoint, early stopping "
            "and the curves follow the mean Dice; add other metrics beside it"
        )
    model = _model_to_check(cfg["model"])
    spacing = data["target_spacing"]
    if spacing is not None and min(spacing) <= 0:
        raise ConfigError(f"'data.target_spacing' = {spacing} must be three positive spacings (z, y, x) in mm")
    # The transforms check what a single field cannot (a range's low <= high) on construction.
    for name, section in cfg["augmentation"].items():
        if name not in AUGMENTATIONS:  # "enabled"
            continue
        try:
            AUGMENTATIONS[name](**section)
        except SettingError as error:
            raise ConfigError(
                f"'augmentation.{name}.{error.setting}' = {error.value} must be {error.expected}"
            ) from None
    if model.spatial_dims == 2 and data["patch_size"][0] != 1:
        raise ConfigError(
            f"'data.patch_size' = {data['patch_size']} must start with 1 for a 2D model (slices), e.g. [1, 192, 160]"
        )
    ((model_name, _),) = cfg["model"].items()
    _check_patch_size(data["patch_size"], model, model_name)
    sgd = cfg["optimizer"].get("sgd")
    if sgd is not None and sgd["nesterov"] and sgd["momentum"] <= 0:
        raise ConfigError(
            "'optimizer.sgd.nesterov' = true needs 'optimizer.sgd.momentum' > 0; "
            "set optimizer.sgd.nesterov=false for plain SGD"
        )
    micro = cfg["device_train_microbatch_size"]
    if isinstance(micro, int) and micro > cfg["train_batch_size"]:
        raise ConfigError(
            f"'device_train_microbatch_size' = {micro} exceeds 'train_batch_size' = {cfg['train_batch_size']}"
        )


def _fits(model: SegmentationModel, patch: list[int]) -> bool:
    try:
        model.check_input_size(patch[3 - model.spatial_dims :])
    except ValueError:
        return False
    return True


def _check_patch_size(patch: list[int], model: SegmentationModel, model_name: str) -> None:
    """Every patch entry >= 1, and the patch passes through the model (its spatial axes: the last
    ``model.spatial_dims``). When the sizes that fit are the multiples of the model's total stride
    ("same" padding), the message names the nearest ones; otherwise it is the model's own."""
    if min(patch) < 1:
        raise ConfigError(f"'data.patch_size' = {patch}: every entry must be at least 1 voxel")
    try:
        model.check_input_size(patch[3 - model.spatial_dims :])
        return
    except ValueError as exc:
        reason = str(exc)
    stride = dict(zip(range(3 - model.spatial_dims, 3), model.total_stride()))
    below = [max(stride[a], patch[a] // stride[a] * stride[a]) if a in stride else patch[a] for a in range(3)]
    above = [-(-patch[a] // stride[a]) * stride[a] if a in stride else patch[a] for a in range(3)]
    if not (_fits(model, below) and _fits(model, above)):
        raise ConfigError(f"'data.patch_size' = {patch} does not fit the model: {reason}")
    nearest = str(below) if below == above else f"{below} or {above}"
    per_axis = ", ".join(
        f"{patch[a]} -> {' or '.join(map(str, dict.fromkeys((below[a], above[a]))))}"
        for a in stride
        if patch[a] % stride[a]
    )
    totals = sorted(set(stride.values()))
    multiple = (
        f"a multiple of {totals[0]}, the model's total stride"
        if len(totals) == 1
        else f"a multiple of the model's total stride on its axis, {list(stride.values())}"
    )
    raise ConfigError(
        f"'data.patch_size' = {patch}: each entry must be {multiple} (the product of model.{model_name}.strides); "
        f"nearest valid: {per_axis}, e.g. {nearest}"
    )
