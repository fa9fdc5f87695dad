"""The recipe comparison of scripts/bench_quality.py (``--compare recipes``) and its held-out pose shift
(``--pose-shift``).

Recipes. Three runs of our trainer that differ only in their augmentation; the demo's model, optimizer,
learning rate, schedule, loss, patch, batch and steps are kept for all three:

    composer       the demo's recipe (Composer's augmentation: flips, noise, blur, brightness, contrast);
    rotate_scale   the same plus nnU-Net's rotation and scaling alone, with the probabilities and ranges
                   configs/brats-nnunet.yaml gives it (0.2 / 0.2, up to 30 degrees, 0.7-1.4);
    nnunet         the whole augmentation section of configs/brats-nnunet.yaml (nnU-Net's set at its
                   probabilities, Composer's blur, brightness and contrast off).

Both come from that config file, read when the benchmark runs, so they follow it.

Pose shift. Real patients' heads are not all posed alike. The shifted validation set holds the
validation cases again, each turned by an angle ``U(-20, 20)`` degrees about every axis and scaled by
one factor ``U(0.85, 1.15)`` about its volume centre (a factor above 1 samples a wider field: the head
looks smaller), resampled trilinearly (labels nearest) with the training transform's own
:func:`~unet_trainer.training.spatial.resample_affine`, zeros outside. The draws come from
``torch.Generator().manual_seed(seed)``, one row per case in the order given, so a seed always gives
the same set. The cases are written once as a raw dataset in the BraTS 2021 layout and prepared
like any dataset; every run of the benchmark is then scored on it by the same evaluator as on the
unshifted set (:class:`ShiftedScores`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from unet_trainer.config.config import resolve_config
from unet_trainer.data.layouts import open_dataset, read_case
from unet_trainer.data.layouts.brats import BRATS2021
from unet_trainer.data.layouts.files import write_layout_case
from unet_trainer.evaluation.evaluation import DiceEvaluator
from unet_trainer.training.spatial import resample_affine, rotation_matrices
from unet_trainer.training.trainer import Callback, State

REPO = Path(__file__).resolve().parent.parent
NNUNET_CONFIG = REPO / "configs" / "brats-nnunet.yaml"
RECIPES = ("composer", "rotate_scale", "nnunet")  # the first is the reference the others are read against
POSE_MAX_DEG = 20.0
POSE_SCALE = (0.85, 1.15)
SHIFTED_PREFIX = "pose/"  # a history row's keys scored on the shifted validation set


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def recipe_overrides(recipe: str) -> list[str]:
    """The ``KEY=VALUE`` overrides that turn the demo config into ``recipe`` (one of :data:`RECIPES`).

    Raises:
        ValueError: an unknown recipe.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    if recipe == "composer":
        return []
    augmentation = resolve_config(NNUNET_CONFIG)["augmentation"]
    transforms = ["rotate_scale"] if recipe == "rotate_scale" else [k for k in augmentation if k != "enabled"]
    return [
        f"augmentation.{name}.{key}={json.dumps(value)}"
        for name in transforms
        for key, value in augmentation[name].items()
    ]


# --------------------------------------------------------------------------------------------
# The shifted validation set
# --------------------------------------------------------------------------------------------


def pose_matrices(count: int, seed: int) -> torch.Tensor:
    """``(count, 3, 3)`` float64 affines (input voxel offset per output voxel offset), row ``i`` for the
    ``i``-th case: a rotation of ``U(-POSE_MAX_DEG, POSE_MAX_DEG)`` degrees about each axis times one
    scale ``U(*POSE_SCALE)``."""
    uniform = torch.rand(count, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    angles = (2 * uniform[:, :3] - 1) * math.radians(POSE_MAX_DEG)
    low, high = POSE_SCALE
    return rotation_matrices(angles) * (low + (high - low) * uniform[:, 3])[:, None, None]


def shift_case(image: np.ndarray, label: np.ndarray, matrix: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Resample one case about its volume centre: ``image`` float32 ``(C, Z, Y, X)`` trilinear,
    ``label`` uint8 ``(Z, Y, X)`` nearest, ``matrix`` ``(3, 3)``; the same shapes and dtypes out."""
    shifted_image, shifted_label = resample_affine(
        torch.from_numpy(image)[None], torch.from_numpy(label)[None, None], matrix[None].float(), label.shape
    )
    return shifted_image[0].numpy(), shifted_label[0, 0].numpy()


def write_pose_shifted(source: Path, case_ids: list[str], out: Path, seed: int) -> Path:
    """Write ``case_ids`` of the raw dataset ``source``, pose-shifted (:func:`pose_matrices` of
    ``seed``), as a BraTS 2021 dataset at ``out``; a complete one of the same settings is kept.

    The set is built in a temporary sibling and renamed into place, so an interrupted run leaves
    none half written. ``out/pose.json`` records the source, cases, seed, ranges and matrices.

    Raises:
        FileExistsError: ``out`` exists and holds another shifted set.
        DataFormatError: a case of ``source`` cannot be read.
    """
    matrices = pose_matrices(len(case_ids), seed)
    settings = {
        "source": str(source),
        "cases": list(case_ids),
        "seed": seed,
        "max_deg": POSE_MAX_DEG,
        "scale": list(POSE_SCALE),
        "matrices": matrices.tolist(),
    }
    marker = out / "pose.json"
    if out.exists():
        if marker.is_file() and json.loads(marker.read_text()) == settings:
            return out
        raise FileExistsError(f"{out}: exists and holds another pose-shifted set; remove it or choose another --work")
    files = {case.case_id: case for case in open_dataset(source, "brats2021").cases}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for case_id, matrix in zip(case_ids, matrices):
            raw = read_case(files[case_id])
            image, label = shift_case(raw.image, raw.label, matrix)
            write_layout_case(staging, BRATS2021, case_id, image, label, raw.affine)
        (staging / "pose.json").write_text(json.dumps(settings, indent=1))
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


class ShiftedScores(Callback):
    """Scores the model on the shifted validation set at every evaluation, with the weights the
    trainer's own evaluator sees (at ``eval_start``, after algorithms such as EMA swapped theirs in).

    ``history``: one ``{"step", "pose/<key>": Dice}`` per evaluation, ``<key>`` as ``dice/<key>`` of
    the evaluator's result.
    """

    def __init__(self, evaluator: DiceEvaluator):
        self.evaluator = evaluator
        self.history: list[dict] = []

    def eval_start(self, state: State) -> None:
        state.model.eval()
        means, _ = self.evaluator.score_model(state.unwrapped_model)
        state.model.train()
        self.history.append({"step": state.timestamp.batch, **shifted_keys(means)})


def shifted_keys(means: dict[str, float]) -> dict[str, float]:
    """The evaluator's plain Dice keys as ``pose/<key>`` (other metrics, keyed with a ``/``, left out)."""
    return {f"{SHIFTED_PREFIX}{k}": float(v) for k, v in means.items() if "/" not in k}
