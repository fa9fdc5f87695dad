"""Export a checkpoint (or a ``unet-cv`` ensemble) to ONNX and TorchScript: the logic behind ``unet-export``.

:func:`export_models` writes one folder that needs nothing of this package to be used: per model a graph
file per format (:data:`EXPORT_FILES`) and one ``model.json`` (:func:`model_document`) saying what
the input channels are, what the outputs mean and how they become labels (canonical and every layout's
native numbering), how a case is prepared, the sliding-window settings, the postprocessing rules, and
which version exported which checkpoints of which runs.

Each graph takes a batch of patches (N, C, *patch) float32, N free, and returns the logits
(N, K, *output) float32 of the full-resolution head (deep-supervision heads are not part of it). It is
checked before the folder is complete: read back the way ``unet-predict`` runs it (onnxruntime on the CPU,
``torch.jit.load``), on random and phantom patches in a batch of 2 (the graph was traced with 1), its
output must equal torch's within :data:`TOLERANCES`. The folder appears in one rename once every file is
written and checked, so a half-written export never looks complete.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from .. import __version__
from ..core.checkpoint import checkpoint_identity, one_line
from ..core.fileio import atomic_write_json, atomic_write_text, temporary_sibling
from ..core.guard import check_outputs
from ..data.layouts import (
    CONVENTION_SCHEME,
    DLE_LABEL_CONVENTIONS,
    LAYOUTS,
    native_of_class,
    native_regions,
)
from ..data.phantom import make_phantom_case
from ..data.prepare import zscore_nonzero
from ..data.schemes import SCHEMES, LabelScheme
from ..evaluation.inference import gaussian_importance, model_output_window
from ..evaluation.postprocessing import Postprocessing
from ..models.blocks import InstanceNorm
from .builders import build_scheme
from .bundle import BUNDLE_MODEL, bundle_files, check_bundle
from .exported import FILE_FORMAT, FILE_VERSION, GRAPH_FILES, MODEL_JSON, ExportError, load_graph, require_format
from .loading import EnsembleModel, LoadedModel, expand_checkpoints, load_models

#: The largest |exported - torch| logit difference each format may show on the check patches.
TOLERANCES: dict[str, float] = {"onnx": 1e-4, "torchscript": 1e-5, "monai-bundle": 1e-5}
#: Every format's model file: the graphs unet-predict runs, and the MONAI bundle's TorchScript graph.
EXPORT_FILES: dict[str, str] = {**GRAPH_FILES, "monai-bundle": BUNDLE_MODEL}
# What reads each format's file back for its check.
RUNTIMES: dict[str, str] = {"onnx": "onnx", "torchscript": "torchscript", "monai-bundle": "torchscript"}
#: The ONNX operator set the graphs are written with.
ONNX_OPSET = 18
# Exported and checked on the CPU in float32: the graph must not depend on where it was traced.
EXPORT_OVERRIDES = ("device=cpu", "precision=fp32")


class LogitsOnly(torch.nn.Module):
    """A segmentation model as exported: a batch of patches to the full-resolution logits only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        # In eval mode the model returns one tensor; a list is training's deep supervision.
        return out[0] if isinstance(out, (list, tuple)) else out


class AxiswiseInstanceNorm(torch.nn.Module):
    """:class:`~unet_trainer.models.blocks.InstanceNorm` as plain means, one spatial axis at a time, for ONNX.

    onnxruntime's CPU InstanceNormalization accumulates its statistics over the whole window in float32
    in one pass: over a 64^3 window of a phantom patch through the ``brats.yaml`` network it is 1e-3 from
    float64, torch 1e-6. Means taken axis by axis add at most one axis' voxels at a time, and the variance
    is taken around the mean (two passes), which keeps the exported graph within 3e-5 of torch there.
    Shapes: ``(B, C, *S) -> (B, C, *S)``; same parameters as the module it stands for.
    """

    def __init__(self, norm: InstanceNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:
        for dim in range(2, x.ndim):
            x = x.mean(dim, keepdim=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        scale = torch.rsqrt(self._mean(centred * centred) + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return centred * scale * self.weight.view(shape) + self.bias.view(shape)


def onnx_ready(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose instance norms are :class:`AxiswiseInstanceNorm` (the original is untouched)."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, InstanceNorm):
                setattr(parent, name, AxiswiseInstanceNorm(child))
    return module


def write_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``module`` to one ONNX file (weights inside), batch dimension dynamic, instance norms as
    :class:`AxiswiseInstanceNorm`."""
    module = onnx_ready(module)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter logs which optional libraries' operators it skips; none of them is ours.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["patch"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def write_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace ``module`` into a TorchScript file (its shapes checks run on the example, batch left free)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks turned constants
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript, "monai-bundle": write_torchscript}


def check_patches(in_channels: int, window: Sequence[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """The patches each graph is checked on, each a batch of 2 (N, C, *window) float32:

    ``random``: standard normal values; ``phantom``: a phantom case z-scored as preparation does, cut
    around its tumour (and the same patch flipped), for 2D windows the slice through the tumour's centre.
    """
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn((2, in_channels) + tuple(window), generator=generator)
    spatial = tuple(window) if len(window) == 3 else (1,) + tuple(window)
    image, label = make_phantom_case(tuple(max(24, n) for n in spatial), np.random.default_rng(seed))
    image = zscore_nonzero(image)
    centre = np.argwhere(label > 0).mean(0).astype(int) if label.any() else np.array(label.shape) // 2
    starts = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, spatial, label.shape)]
    patch = image[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(starts, spatial))]
    patch = torch.from_numpy(np.ascontiguousarray(patch if len(window) == 3 else patch[:, 0]))
    channels = torch.arange(in_channels) % patch.shape[0]  # a model of other than 4 channels reuses them
    phantom = torch.stack([patch[channels], patch[channels].flip(-1)])
    return {"random": random, "phantom": phantom}


def check_graph(fmt: str, graph, module: torch.nn.Module, patches: dict[str, torch.Tensor]) -> float:
    """The largest |graph - module| logit difference over the check patches.

    Raises:
        ExportError: a shape that differs, a non-finite output or a difference above ``TOLERANCES[fmt]``:
            one line naming the format, the patches and the difference.
    """
    tolerance = TOLERANCES[fmt]
    worst = 0.0
    for name, batch in patches.items():
        with torch.no_grad():
            expected = module(batch)
            try:
                got = graph(batch)
            except Exception as exc:  # the runtimes raise their own types
                raise ExportError(
                    f"{fmt}: the exported graph fails on the {name} patches ({one_line(str(exc))})"
                ) from None
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(
                f"{fmt}: the exported graph returns {tuple(got.shape)} for the {name} patches; torch returns "
                f"{tuple(expected.shape)}"
            )
        difference = float((got.float() - expected).abs().max())
        if not np.isfinite(difference) or difference > tolerance:
            raise ExportError(
                f"{fmt}: the exported graph differs from torch by {difference:.3g} on the {name} patches "
                f"(tolerance {tolerance:g}); the graph is not written"
            )
        worst = max(worst, difference)
    return worst


@dataclass
class ExportedFiles:
    """What was written and checked for one model: graph file per format, largest difference per format."""

    files: dict[str, str]
    differences: dict[str, float]
    window: tuple[int, ...]
    output_window: tuple[int, ...]


def export_member(member: LoadedModel, folder: Path, prefix: str, formats: Sequence[str]) -> ExportedFiles:
    """Write and check ``member``'s graph in every format under ``folder`` (names prefixed by ``prefix``).

    Raises:
        ExportError: a format that cannot be exported or whose graph fails its check.
    """
    window = member.patch_size if member.spatial_dims == 3 else member.patch_size[1:]
    output_window = model_output_window(member.model, window) or tuple(window)
    module = LogitsOnly(member.model)
    patches = check_patches(member.in_channels, window)
    example = patches["random"][:1]  # traced with one patch; checked with two (dynamic batch)
    files, differences = {}, {}
    for fmt in formats:
        path = folder / f"{prefix}{EXPORT_FILES[fmt]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            WRITERS[fmt](module, example, path)
        except Exception as exc:  # the exporters raise many types; each is this format's failure
            raise ExportError(f"{fmt}: {member.checkpoint} cannot be exported ({one_line(str(exc))})") from None
        differences[fmt] = check_graph(fmt, load_graph(RUNTIMES[fmt], path, torch.device("cpu")), module, patches)
        files[fmt] = path.relative_to(folder).as_posix()
    return ExportedFiles(files, differences, tuple(window), tuple(output_window))


# --------------------------------------------------------------------------------------------
# model.json
# --------------------------------------------------------------------------------------------


def labels_section(scheme: LabelScheme) -> dict:
    """The label scheme: its classes and regions, and the native numbering of each layout whose
    files hold a scheme of these classes."""
    native = {}
    for name, layout in LAYOUTS.items():
        conventions = [*layout.scheme_conventions(DLE_LABEL_CONVENTIONS[0]).values(), layout.label_convention]
        if scheme.definition and layout.dataset_schemes is not None:
            conventions.insert(0, scheme.name)  # a dataset.json's scheme: its own numbering (value = class)
        own = next((c for c in conventions if SCHEMES[CONVENTION_SCHEME[c]].compatible_with(scheme)), None)
        if own is not None:
            native[name] = {
                "label_of_class": {str(c): n for c, n in native_of_class(own).items()},
                "regions": {r: list(v) for r, v in native_regions(own, scheme.regions).items()},
            }
    return {
        "scheme": scheme.name,
        "scheme_definition": scheme.definition or None,
        "title": scheme.title,
        "classes": {"0": "background", **{str(i): name for i, name in scheme.label_names.items()}},
        "descriptions": {str(i + 1): text for i, text in enumerate(scheme.class_descriptions)},
        "regions": {name: list(values) for name, values in scheme.regions.items()},
        "native": native,
        "source": scheme.source,
    }


def output_section(region_mode: bool, num_outputs: int, scheme: LabelScheme) -> dict:
    """What the logits' channels are and how they become class indices."""
    if region_mode:
        painted = dict(zip(scheme.trained_regions, scheme.regions_class_order))
        order = ", ".join(f"inside {region} class {index}" for region, index in painted.items())
        return {
            "mode": "regions",
            "names": list(scheme.trained_regions),
            "activation": "sigmoid",
            "to_labels": f"sigmoid per channel, then > 0.5: {order} (later regions win); else 0",
            "threshold": 0.5,
            "label_inside": painted,
        }
    return {
        "mode": "classes",
        "names": ["background", *scheme.classes][:num_outputs],
        "activation": "softmax",
        "to_labels": "argmax over the channels is the class index",
    }


def preprocessing_section(loaded: LoadedModel | EnsembleModel) -> dict:
    settings = loaded.prepare_settings
    return {
        "array_order": "(C, Z, Y, X): a NIfTI's (x, y, z) data transposed",
        "crop_to_nonzero": "crop to the bounding box of voxels nonzero in any channel; predictions outside it "
        "are background",
        "target_spacing_mm": list(settings.target_spacing) if settings.target_spacing else None,
        "resampling": "trilinear to target_spacing_mm (z, y, x) when set, probabilities back to the crop's size "
        "(trilinear) before labelling",
        "normalization": "per channel, z-score over that channel's nonzero voxels; zero voxels stay 0 "
        "(DLE arrays are already normalised)",
        "dle_labels": settings.dle_labels,
    }


def window_section(member: LoadedModel, exported: ExportedFiles) -> dict:
    window = member.sliding_window
    sigma = inspect.signature(gaussian_importance).parameters["sigma_scale"].default
    return {
        "patch_size": list(window.patch_size),
        "spatial_dims": window.spatial_dims,
        "window": list(exported.window),
        "output_window": list(exported.output_window),
        "overlap": window.overlap,
        "batch_size": window.batch_size,
        "gaussian": window.gaussian,
        "gaussian_sigma_scale": sigma,
        "mirror": window.mirror,
        "slice_by_slice": window.spatial_dims == 2,
    }


def member_entry(member: LoadedModel, where: str, exported: ExportedFiles) -> dict:
    run_id, batch = checkpoint_identity(member.checkpoint)
    return {
        "source": where or "checkpoint",
        "checkpoint": str(member.checkpoint),
        "run_id": run_id,
        "batch": batch,
        "epoch": member.timestamp.get("epoch"),
        "weights": member.weights,
        "architecture": type(member.model).__name__,
        "files": exported.files,
        "max_difference_to_torch": exported.differences,
        "sliding_window": window_section(member, exported),
    }


def model_document(
    loaded: LoadedModel | EnsembleModel,
    entries: list[dict],
    formats: Sequence[str],
    postprocess: Postprocessing | None,
) -> dict:
    """model.json: everything a user of the folder needs to prepare inputs and read outputs."""
    scheme = build_scheme(loaded.cfg)
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "exported_by": {
            "package": f"unet-trainer {__version__}",
            "torch": torch.__version__,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "formats": {
            fmt: {
                "file": EXPORT_FILES[fmt],
                "tolerance": TOLERANCES[fmt],
                **({"opset": ONNX_OPSET} if fmt == "onnx" else {}),
            }
            for fmt in formats
        },
        "graph": "input 'patch' (N, C, *window) float32, N free; output 'logits' (N, K, *output_window) float32",
        "input": {"channels": list(scheme.channels), "dtype": "float32"},
        "output": output_section(loaded.region_mode, loaded.num_outputs, scheme),
        "labels": labels_section(scheme),
        "preprocessing": preprocessing_section(loaded),
        "ensemble": "probabilities (after the activation) averaged over the models" if len(entries) > 1 else None,
        "models": entries,
        "postprocessing": None
        if postprocess is None
        else {"kept": list(postprocess.rules), "described": postprocess.describe(), "source": str(postprocess.path)},
    }


# --------------------------------------------------------------------------------------------
# unet-export
# --------------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, given: Sequence[Path], checkpoints: Sequence[Path]) -> None:
    """Raises:
    ExportError: ``out_dir`` exists and is not an empty folder. OutputPathError: it clashes with an input."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: already exists; choose a new folder (an export is never written over)")
    models = [("the model folder" if p.is_dir() else "the checkpoint", p) for p in given]
    check_outputs([("the export folder", out_dir)], files=models + [("the checkpoint", c) for c in checkpoints])


def export_models(
    checkpoints: Path | Sequence[Path],
    out_dir: Path,
    formats: Sequence[str],
    overrides: Sequence[str] = (),
    postprocess: Postprocessing | None = None,
    log: TextIO | None = None,
) -> dict:
    """Export a checkpoint, or every model of an ensemble (``unet-cv`` folder, several checkpoints), into
    ``out_dir``.

    Args:
        checkpoints: as ``unet-predict`` takes them (:func:`loading.load_models`).
        out_dir: must not exist yet (or be an empty folder); it appears complete or not at all.
        formats: keys of :data:`EXPORT_FILES`, each written and checked (``monai-bundle`` also writes the
            bundle's configs and README, :mod:`bundle`).
        overrides: config overrides (e.g. ``eval.mirror_tta=true``), recorded in the window settings.
        postprocess: the rules to record (applied by ``unet-predict`` on the folder).
        log: where the ensemble's members are listed (default stderr).

    Returns:
        The model.json document written.

    Raises:
        ExportError: a format whose libraries are missing, that cannot be exported or whose graph fails its
            check (one line naming the format); ``out_dir`` exists.
        CheckpointError, ConfigError, EnsembleError, OutputPathError: as ``unet-predict``.
    """
    for fmt in formats:
        require_format(fmt)
    log = sys.stderr if log is None else log
    out_dir = Path(out_dir).expanduser()
    given = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(c) for c in checkpoints]
    found = expand_checkpoints(given)
    loaded = load_models(given, [*overrides, *EXPORT_OVERRIDES], log)
    members = loaded.members if isinstance(loaded, EnsembleModel) else [loaded]
    _check_out_dir(out_dir, given, loaded.checkpoints)
    if "monai-bundle" in formats:
        check_bundle(
            len(members), members[0].spatial_dims, loaded.prepare_settings.target_spacing, build_scheme(loaded.cfg)
        )
    staging = temporary_sibling(out_dir)
    staging.mkdir(parents=True)
    try:
        entries = []
        for index, (member, (_, where)) in enumerate(zip(members, found)):
            prefix = f"member{index}_" if len(members) > 1 else ""
            entries.append(member_entry(member, where, export_member(member, staging, prefix, formats)))
        document = model_document(loaded, entries, formats, postprocess)
        if "monai-bundle" in formats:
            for name, text in bundle_files(document).items():
                atomic_write_text(staging / name, text)
        atomic_write_json(staging / MODEL_JSON, document)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked): the rename below puts the complete folder in its place
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return document
