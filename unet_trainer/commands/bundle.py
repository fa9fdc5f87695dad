"""A MONAI bundle of an exported model: what ``unet-export --format monai-bundle`` adds to the folder, so that
MONAI's own runner (``python -m monai.bundle run --config_file configs/inference.json``) predicts with it.

The layout follows MONAI's bundle specification (``docs/source/mb_specification.rst``): ``configs/metadata.json``
with ``network_data_format``, ``configs/inference.json``, ``models/model.ts`` (the TorchScript graph, checked as
``unet-export`` checks every graph) and ``docs/README.md``. The inference config uses MONAI's transforms and
inferer where they match ours: ``LoadImaged`` (the four modality files stacked as channels), ``Transposed`` to
our (C, Z, Y, X) order, ``CropForegroundd`` (voxels nonzero in any channel), ``NormalizeIntensityd`` (per
channel over nonzero voxels), ``SlidingWindowInferer`` (the window, overlap and window batch of model.json,
Gaussian weighting with sigma 1/8 of the window), ``Activationsd``, ``Invertd`` (back to the raw grid),
``AsDiscreted`` or the nested region rule, ``MapLabelValued`` (canonical to the native numbering) and
``SaveImaged``. What differs from ``unet-predict`` is in :data:`DIFFERENCES`.
"""

from __future__ import annotations

import json

import torch

from ..data.layouts import native_of_class
from ..data.schemes import SCHEMES, LabelScheme
from .exported import ExportError

BUNDLE_MODEL = "models/model.ts"
#: The layout and numbering the bundle's datalist reads and writes by default (overridable on the runner's line).
BUNDLE_CONVENTION = "brats2021"

DIFFERENCES = (
    "MONAI's Gaussian importance map and window placement differ slightly from ours (windows spread evenly, "
    "weights centred between voxels), so a few boundary voxels may take another label: on the phantom over "
    "99.5% of voxels agree with unet-predict",
    "no mirroring test-time augmentation (MONAI's inferer has none), whatever model.json's sliding_window.mirror",
    "no postprocessing rules (model.json's postprocessing, if any, is for unet-predict)",
)


def check_bundle(
    num_models: int, spatial_dims: int, target_spacing: tuple[float, ...] | None, scheme: LabelScheme
) -> None:
    """Raises:
    ExportError: what one bundle cannot hold: several models, a 2D model, a model trained at a target
        spacing (MONAI's affine resampling is not our voxel-grid resampling), or one of another label
        scheme than the BraTS 2021 folders its datalist reads."""
    if not scheme.compatible_with(SCHEMES[BUNDLE_CONVENTION]):
        raise ExportError(
            f"monai-bundle: only models of the BraTS glioma classes (the bundle reads BraTS 2021 folders); "
            f"this one predicts {scheme.name} ({', '.join(scheme.classes)})"
        )
    if num_models != 1:
        raise ExportError(f"monai-bundle: a bundle holds one model, not an ensemble of {num_models}; export one")
    if spatial_dims != 3:
        raise ExportError(
            "monai-bundle: only 3D models (a 2D model predicts slice by slice, which MONAI's inferer does not)"
        )
    if target_spacing:
        raise ExportError(
            "monai-bundle: a model trained at data.target_spacing cannot be bundled yet (resampling differs)"
        )


def _to_labels(document: dict) -> list[dict]:
    """The transforms from logits to canonical labels."""
    if document["output"]["mode"] == "regions":
        # Nested regions (WT, TC, ET) -> canonical labels: inside WT 2, inside TC 1, inside ET 3.
        rule = (
            "$lambda p: torch.where(p[2:3] > 0.5, 3, torch.where(p[1:2] > 0.5, 1, "
            "torch.where(p[0:1] > 0.5, 2, 0))).to(torch.uint8)"
        )
        return [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
            {"_target_": "Lambdad", "keys": "pred", "func": rule},
        ]
    return [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]


def inference_config(document: dict) -> dict:
    """configs/inference.json: read every case of ``dataset_dir`` (BraTS 2021 layout), predict, write
    ``<case>_flair_seg.nii.gz`` into ``output_dir`` in the native numbering."""
    window = document["models"][0]["sliding_window"]
    native = native_of_class(BUNDLE_CONVENTION)
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        {"_target_": "Transposed", "keys": "image", "indices": [0, 3, 2, 1]},  # (C, x, y, z) -> (C, Z, Y, X)
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "select_fn": "$lambda x: x != 0"},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
    ]
    postprocessing = _to_labels(document) + [
        {
            "_target_": "MapLabelValued",
            "keys": "pred",
            "orig_labels": sorted(native),
            "target_labels": [native[c] for c in sorted(native)],
        },
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_dtype": "$numpy.uint8",
            "resample": False,
            "separate_folder": False,
        },
    ]
    case_files = (
        "$[{'image': [f[: -len('flair.nii.gz')] + c + '.nii.gz' for c in @channels]} "
        "for f in sorted(glob.glob(os.path.join(@dataset_dir, '*', '*_flair.nii.gz')))]"
    )
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "channels": document["input"]["channels"],
        "datalist": case_files,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network": f"$torch.jit.load(os.path.join(@bundle_root, '{BUNDLE_MODEL}'), map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": window["window"],
            "sw_batch_size": window["batch_size"],
            "overlap": window["overlap"],
            "mode": "gaussian" if window["gaussian"] else "constant",
            "sigma_scale": window["gaussian_sigma_scale"],
        },
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        # One case at a time through MONAI's inferer and transforms (its evaluator engine would need ignite).
        "run": [
            "$[@postprocessing(dict(item, pred=@inferer(item['image'][None].to(@device), @network)[0])) "
            "for item in @dataset]"
        ],
    }


def metadata(document: dict) -> dict:
    """configs/metadata.json, with the ``network_data_format`` of MONAI's specification."""
    import monai
    import numpy

    window = document["models"][0]["sliding_window"]
    channels = document["input"]["channels"]
    outputs = document["output"]["names"]
    return {
        "version": "0.1.0",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": "", "fire": ""},
        "task": "Brain tumour segmentation (BraTS) from four MR modalities",
        "description": f"Exported by {document['exported_by']['package']}; see docs/README.md and model.json",
        "authors": "unet-trainer",
        "copyright": "",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": len(channels),
                    "spatial_shape": window["window"],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): name for i, name in enumerate(channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(outputs),
                    "spatial_shape": window["output_window"],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): name for i, name in enumerate(outputs)},
                }
            },
        },
    }


def readme(document: dict) -> str:
    """docs/README.md: how to run the bundle, and what differs from ``unet-predict``."""
    entry = document["models"][0]
    lines = [
        "# Brain tumour segmentation bundle",
        "",
        f"Exported by {document['exported_by']['package']} from checkpoint `{entry['checkpoint']}` "
        f"(run {entry['run_id']}, batch {entry['batch']}). `model.json` next to `configs/` says what the "
        "inputs, outputs, labels and preprocessing are.",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . "
        "--dataset_dir /path/to/BraTS2021 --output_dir predictions",
        "```",
        "",
        f"Reads every case folder of `dataset_dir` in the {BUNDLE_CONVENTION} layout "
        "(`<case>/<case>_{flair,t1,t1ce,t2}.nii.gz`) and writes `<case>_flair_seg.nii.gz` in its numbering "
        "(override `datalist` and the `MapLabelValued` labels for other layouts).",
        "",
        "What differs from `unet-predict` on the same model:",
        "",
        *[f"- {difference}." for difference in DIFFERENCES],
        "",
    ]
    return "\n".join(lines)


def bundle_files(document: dict) -> dict[str, str]:
    """The bundle's text files by path inside the export folder (the graph, ``BUNDLE_MODEL``, is written apart)."""
    return {
        "configs/inference.json": json.dumps(inference_config(document), indent=1) + "\n",
        "configs/metadata.json": json.dumps(metadata(document), indent=1) + "\n",
        "docs/README.md": readme(document),
    }
