"""Benchmark the batched augmenter against MONAI's per-sample dictionary transforms.

Reports augmented patches per second for each batch size, on the CPU and/or on
CUDA, for two settings:

* ``default``: the recipe's probabilities (flips 0.5 per axis, the rest 0.15);
* ``all-fire``: every probability 1, the worst case for one batch.

The MONAI baseline is what a CPU DataLoader worker would do: the equivalent
``Compose`` applied to one sample at a time on the CPU, single process (a
DataLoader spreads it over workers; divide by the worker count you can spare).
On CUDA (and on the CPU with ``--share``) it also times one forward+backward
step of the BraTS 3D U-Net at batch 2 (bf16 autocast on CUDA, fp32 on the CPU)
and reports the augmentation as a share of it. ``--json`` writes every figure.

With ``--set nnunet`` it times nnU-Net v2's augmentation set instead: ours, batched, as
``configs/brats-nnunet.yaml`` trains with it (rotation and scaling resampled from the larger region
the loader crops), against nnU-Net's own batchgeneratorsv2 pipeline one sample at a time on the CPU
from nnU-Net's initial patch (``scripts/nnunet_pipeline.py``; ``pip install batchgeneratorsv2``), at
nnU-Net's probabilities and with every transform firing.

Example (quick CPU check):
    python scripts/bench_transforms.py --device cpu --patch 64 --batches 2 --iters 3
    python scripts/bench_transforms.py --set nnunet --device cpu --batches 2 --iters 5 --warmup 1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchutil import cpu_model_name, median_seconds

from unet_trainer.training.augment import BatchAugmenter, recipe
from unet_trainer.training.batch_transform import BatchTransform

CHANNELS = 4
NUM_CLASSES = 4
SEED = 0


@dataclass(frozen=True)
class Setting:
    name: str
    flip_p: float
    transform_p: float  # noise, blur, brightness and contrast alike

    def augmentation_transforms(self) -> dict[str, BatchTransform]:
        """The recipe with these probabilities and its default ranges."""
        others = ("noise", "blur", "brightness", "contrast")
        return recipe(flip={"p": self.flip_p}, **{name: {"p": self.transform_p} for name in others})


SETTINGS = (Setting("default", flip_p=0.5, transform_p=0.15), Setting("all-fire", flip_p=1.0, transform_p=1.0))


def make_batch(batch: int, patch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A z-scored-like float32 image (B, 4, P, P, P) and a uint8 label (B, 1, P, P, P)."""
    generator = torch.Generator().manual_seed(SEED)
    image = torch.randn((batch, CHANNELS, patch, patch, patch), generator=generator)
    label = torch.randint(0, NUM_CLASSES, (batch, 1, patch, patch, patch), generator=generator, dtype=torch.uint8)
    return image.to(device), label.to(device)


# ---------------------------------------------------------------------- MONAI baseline


def make_contrast_transform(keys: str, scale_range: tuple[float, float], prob: float):
    """A MONAI dictionary transform: multiply by ``U(scale_range)``, clamp to the input's own min/max.

    That is our contrast step. MONAI's RandAdjustContrastd is a gamma curve on
    the min-max normalised image, a different (and costlier: ``pow`` per voxel)
    operation, and RandLambdad insists on MetaTensor bookkeeping, so the
    baseline uses this small Randomizable MapTransform: the same arithmetic as
    ours, drawn from MONAI's per-transform random state.
    """
    from monai.transforms import MapTransform, RandomizableTransform

    class RandScaleThenClampToInputRanged(RandomizableTransform, MapTransform):
        def __init__(self) -> None:
            MapTransform.__init__(self, keys)
            RandomizableTransform.__init__(self, prob)
            self.factor = 1.0

        def randomize(self, data: object = None) -> None:
            super().randomize(None)
            self.factor = float(self.R.uniform(*scale_range))

        def __call__(self, data: dict) -> dict:
            self.randomize()
            if not self._do_transform:
                return dict(data)
            result = dict(data)
            for key in self.key_iterator(result):
                image = result[key]
                result[key] = torch.clamp(image * self.factor, image.min(), image.max())
            return result

    return RandScaleThenClampToInputRanged()


def build_monai_pipeline(setting: Setting, augmentation: dict[str, BatchTransform]) -> Callable[[dict], dict]:
    """The closest MONAI equivalent of the recipe, for one (C, D, H, W) sample dict.

    Differences that remain, all in MONAI's disfavour except the last:
    RandGaussianSmoothd draws sigma per axis and uses a kernel truncated at
    about 4 sigma (up to 13 taps) where ours is isotropic with 3 taps (as the
    recipe specifies); RandGaussianNoised draws its noise with NumPy. MONAI
    runs with meta tracking off (set in ``main``) so MetaTensor bookkeeping is
    not counted against it.
    """
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
    )

    sigma = augmentation["blur"].sigma
    low, high = augmentation["brightness"].scale
    if not np.isclose(1.0 - low, high - 1.0):
        raise ValueError("RandScaleIntensityd needs a brightness range symmetric about 1")
    pipeline = Compose(
        [
            *[RandFlipd(keys=["image", "label"], prob=setting.flip_p, spatial_axis=axis) for axis in range(3)],
            # MONAI draws std ~ U(0, std) per call (sample_std=True): the same as noise_std=(0, 0.33).
            RandGaussianNoised(keys="image", prob=setting.transform_p, mean=0.0, std=augmentation["noise"].std[1]),
            RandGaussianSmoothd(keys="image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=setting.transform_p),
            # factors=0.3 multiplies by 1 + U(-0.3, 0.3), i.e. U(0.7, 1.3).
            RandScaleIntensityd(keys="image", factors=1.0 - low, prob=setting.transform_p),
            make_contrast_transform("image", augmentation["contrast"].scale, prob=setting.transform_p),
        ]
    )
    pipeline.set_random_state(seed=SEED)
    return pipeline


# ---------------------------------------------------------------------- measurements


def ours_seconds_per_batch(
    setting: Setting, batch: int, patch: int, device: torch.device, warmup: int, iters: int
) -> float:
    augmenter = BatchAugmenter(setting.augmentation_transforms(), spatial_dims=3, device=device, seed=SEED)
    image, label = make_batch(batch, patch, device)
    return median_seconds(lambda: augmenter(image, label), device, warmup, iters)


def monai_seconds_per_batch(setting: Setting, batch: int, patch: int, warmup: int, iters: int) -> float:
    pipeline = build_monai_pipeline(setting, setting.augmentation_transforms())
    image, label = make_batch(batch, patch, torch.device("cpu"))

    def augment_each_sample() -> list[dict]:
        return [pipeline({"image": image[i], "label": label[i]}) for i in range(batch)]

    return median_seconds(augment_each_sample, torch.device("cpu"), warmup, iters)


def training_step_seconds(patch: int, device: torch.device, warmup: int, iters: int, width_divisor: int = 1) -> float:
    """One forward+backward of the BraTS 3D U-Net at batch 2, cross-entropy loss; bf16 autocast on
    CUDA, fp32 on the CPU (where bf16 3D convolutions are emulated). ``width_divisor`` narrows the
    model for quick CPU runs."""
    from benchutil import brats_3d_model  # imported here: only the share needs the model

    from unet_trainer.models.unet import UNet

    model = UNet(**brats_3d_model(width_divisor)).to(device)
    model.train()
    image, label = make_batch(2, patch, device)
    target = label[:, 0].long()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model(image)
        # With deep supervision a model returns several heads; the first is full resolution.
        logits = output[0] if isinstance(output, (list, tuple)) else output
        F.cross_entropy(logits.float(), target).backward()

    return median_seconds(step, device, warmup, iters)


# ---------------------------------------------------------------------- reporting


def batchgenerators_seconds_per_batch(pipeline, size: tuple[int, ...], batch: int, warmup: int, iters: int) -> float:
    """Seconds for ``batch`` samples through batchgeneratorsv2's ``pipeline``, one after the other."""
    generator = torch.Generator().manual_seed(SEED)
    image = torch.randn((CHANNELS, *size), generator=generator)
    label = torch.randint(0, NUM_CLASSES, (1, *size), generator=generator, dtype=torch.int16)

    def run() -> None:
        for _ in range(batch):
            pipeline(image=image.clone(), segmentation=label.clone())

    return median_seconds(run, torch.device("cpu"), warmup, iters)


def nnunet_rows(arguments: argparse.Namespace, devices: list[torch.device], document: dict, save) -> dict:
    """``--set nnunet``: ours against batchgeneratorsv2 on nnU-Net's augmentation set (module docstring);
    without batchgeneratorsv2 installed, ours alone. Returns our seconds per batch by (setting, device, batch)."""
    import nnunet_pipeline

    patch = (arguments.patch,) * 3
    initial = nnunet_pipeline.nnunet_initial_patch(patch)
    try:
        import batchgeneratorsv2  # noqa: F401
    except ImportError:
        print("batchgeneratorsv2 is not installed (pip install batchgeneratorsv2): ours alone\n")
        initial = None
    header = f"{'setting':<9} {'device':<6} {'batch':>5} {'ours ms/batch':>13} {'bg2 ms/batch':>12} {'ours/bg2':>8}"
    print(header)
    print("-" * len(header))
    ours_seconds: dict[tuple[str, str, int], float] = {}
    for all_fire in (False, True):
        setting = "all-fire" if all_fire else "nnunet"
        pipeline = nnunet_pipeline.batchgenerators_pipeline(patch, all_fire) if initial else None
        transforms, sampled = nnunet_pipeline.our_transforms(patch, all_fire)
        document["regions"] = {"ours": list(sampled), "batchgeneratorsv2": list(initial) if initial else None}
        for batch in arguments.batches:
            theirs = (
                batchgenerators_seconds_per_batch(pipeline, initial, batch, arguments.warmup, arguments.iters)
                if pipeline
                else None
            )
            for device in devices:
                augmenter = BatchAugmenter(transforms, 3, device, SEED)
                image = torch.randn((batch, CHANNELS, *sampled), device=device)
                label = torch.randint(0, NUM_CLASSES, (batch, 1, *sampled), device=device, dtype=torch.uint8)
                ours = median_seconds(
                    lambda run=augmenter, x=image, y=label: run(x, y), device, arguments.warmup, arguments.iters
                )
                ours_seconds[(setting, device.type, batch)] = ours
                peer = f"{theirs * 1e3:>12.1f} {theirs / ours:>7.1f}x" if theirs else f"{'-':>12} {'-':>8}"
                print(f"{setting:<9} {device.type:<6} {batch:>5} {ours * 1e3:>13.1f} {peer}")
                document["rows"].append(
                    {
                        "setting": setting,
                        "device": device.type,
                        "batch": batch,
                        "ours_ms_per_batch": ours * 1e3,
                        "batchgeneratorsv2_ms_per_batch": theirs * 1e3 if theirs else None,
                    }
                )
                save()
    return ours_seconds


def report_shares(
    arguments: argparse.Namespace,
    devices: list[torch.device],
    ours_seconds: dict,
    settings: list[str],
    document: dict,
    save,
) -> None:
    """Each setting's augmentation at batch 2 as a share of one training step, where the augmentation runs in
    training: the GPU (or the CPU with ``--share``)."""
    share_device = next((device for device in devices if device.type == "cuda"), None)
    if share_device is None and arguments.share:
        share_device = devices[-1]
    if share_device is None or not any(key[1:] == (share_device.type, 2) for key in ours_seconds):
        return
    try:
        step_seconds = training_step_seconds(
            arguments.patch, share_device, arguments.warmup, arguments.iters, arguments.width_divisor
        )
    except ImportError as error:
        print(f"\nno training-step comparison: cannot import the U-Net ({error})")
        return
    precision = "bf16 autocast" if share_device.type == "cuda" else "fp32"
    print(
        f"\nU-Net forward+backward on {share_device.type}, batch 2, {precision}"
        f"{f', filters / {arguments.width_divisor}' if arguments.width_divisor > 1 else ''}: {step_seconds * 1e3:.1f} ms"
    )
    document["step_ms"] = step_seconds * 1e3
    document["step_device"] = share_device.type
    document.setdefault("step_share_percent", {})
    for setting in settings:
        key = (setting, share_device.type, 2)
        if key not in ours_seconds:
            continue
        share = 100.0 * ours_seconds[key] / step_seconds
        document["step_share_percent"][setting] = share
        save()
        print(f"augmentation ({setting}, batch 2) = {share:.2f} % of a training step (target < 5 % on an H200)")


def devices_to_run(choice: str) -> list[torch.device]:
    cuda_available = torch.cuda.is_available()
    if choice in ("cuda", "both") and not cuda_available:
        raise SystemExit(f"--device {choice} asked for CUDA, which is not available")
    if choice == "auto":
        return [torch.device("cuda" if cuda_available else "cpu")]
    if choice == "both":
        return [torch.device("cpu"), torch.device("cuda")]
    return [torch.device(choice)]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "both"),
        default="auto",
        help="where our augmenter runs (auto: CUDA if available, else CPU); MONAI always runs on the CPU",
    )
    parser.add_argument(
        "--set",
        choices=("composer", "nnunet"),
        default="composer",
        help="composer: the recipe's transforms against MONAI; nnunet: nnU-Net's set against batchgeneratorsv2",
    )
    parser.add_argument("--patch", type=int, default=128, help="cubic patch edge in voxels (default 128)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="batch sizes (default 2 8)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also time the training step on the CPU (always done on CUDA) and report the share",
    )
    parser.add_argument(
        "--width-divisor",
        type=int,
        default=1,
        help="divide the U-Net's filter counts for the step (quick CPU runs; 1 = the real preset)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write every figure to this JSON file, rewritten after each measurement",
    )
    arguments = parser.parse_args(argv)
    if arguments.patch < 2 or arguments.iters < 1 or arguments.warmup < 0 or min(arguments.batches) < 1:
        parser.error("--patch >= 2, --iters >= 1, --warmup >= 0 and every batch >= 1 are required")
    return arguments


def _write_json(path: Path | None, document: dict) -> None:
    # After each measurement, so a run stopped at a time limit keeps what it measured.
    if path:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(document, indent=1))
        temporary.replace(path)


def main() -> None:
    arguments = parse_arguments()
    devices = devices_to_run(arguments.device)
    if arguments.set == "nnunet":
        print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, CPU: {cpu_model_name()}")
        print(
            f"nnU-Net's augmentation of a {CHANNELS}x{arguments.patch}^3 patch, median of {arguments.iters} after "
            f"{arguments.warmup} warm-up; batchgeneratorsv2 per sample on the CPU, one process\n"
        )
        document = {"torch": torch.__version__, "cpu": cpu_model_name(), "patch": arguments.patch, "rows": []}

        def save_nnunet() -> None:
            _write_json(arguments.json, document)

        seconds = nnunet_rows(arguments, devices, document, save_nnunet)
        report_shares(arguments, devices, seconds, ["nnunet", "all-fire"], document, save_nnunet)
        return

    import monai
    from monai.data import set_track_meta

    set_track_meta(False)

    print(f"torch {torch.__version__}, MONAI {monai.__version__}, CPU threads {torch.get_num_threads()}")
    print(f"CPU: {cpu_model_name()}")
    for device in devices:
        if device.type == "cuda":
            print(f"CUDA: {torch.cuda.get_device_name(device)}")
    print(
        f"patch {CHANNELS}x{arguments.patch}^3 float32 + uint8 label, median of {arguments.iters} "
        f"after {arguments.warmup} warm-up; MONAI per sample on the CPU, one process\n"
    )

    header = f"{'setting':<9} {'device':<6} {'batch':>5} {'ours ms/batch':>13} {'ours patch/s':>12} {'MONAI patch/s':>13} {'ours/MONAI':>10}"
    print(header)
    print("-" * len(header))
    ours_seconds: dict[tuple[str, str, int], float] = {}
    document: dict = {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cpu": cpu_model_name(),
        "patch": arguments.patch,
        "rows": [],
        "step_share_percent": {},
    }

    def save() -> None:
        _write_json(arguments.json, document)

    for setting in SETTINGS:
        for batch in arguments.batches:
            monai_seconds = monai_seconds_per_batch(setting, batch, arguments.patch, arguments.warmup, arguments.iters)
            for device in devices:
                seconds = ours_seconds_per_batch(
                    setting, batch, arguments.patch, device, arguments.warmup, arguments.iters
                )
                ours_seconds[(setting.name, device.type, batch)] = seconds
                print(
                    f"{setting.name:<9} {device.type:<6} {batch:>5} {seconds * 1e3:>13.2f} {batch / seconds:>12.1f} "
                    f"{batch / monai_seconds:>13.1f} {monai_seconds / seconds:>9.1f}x"
                )
                document["rows"].append(
                    {
                        "setting": setting.name,
                        "device": device.type,
                        "batch": batch,
                        "ours_ms_per_batch": seconds * 1e3,
                        "ours_patches_per_s": batch / seconds,
                        "monai_patches_per_s": batch / monai_seconds,
                    }
                )
                save()

    for setting in SETTINGS:  # batch 2 is the one the share reads
        key = (setting.name, devices[-1].type, 2)
        if key not in ours_seconds and (arguments.share or devices[-1].type == "cuda"):
            ours_seconds[key] = ours_seconds_per_batch(
                setting, 2, arguments.patch, devices[-1], arguments.warmup, arguments.iters
            )
    report_shares(arguments, devices, ours_seconds, [setting.name for setting in SETTINGS], document, save)


if __name__ == "__main__":
    main()
