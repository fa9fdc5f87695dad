"""The training pipeline built only from MONAI parts that the benchmarks compare ours against:
scripts/bench_train.py for speed end to end, scripts/bench_quality.py for what it learns.

    data     ``monai_item`` (the phantom's 4 modality files and label file of a case) through
             ``monai_transforms``: LoadImaged, MapLabelValued (BraTS 2021 label 4 -> 3),
             CropForegroundd, FgBgToIndicesd and NormalizeIntensityd (the deterministic prefix a
             CacheDataset caches), then the random crop and the config's augmentation as MONAI
             transforms; arrays are (C, X, Y, Z), as NIfTI stores them
    model    ``build_dynunet``: ``monai.networks.nets.DynUNet`` with the config's levels
    loop     ``run_monai``: ``DiceCELoss`` and the config's optimizer, autocast and microbatch
             accumulation in a plain MONAI-style loop, timed as bench_train times ours; then one
             sliding-window evaluation with ``DiceMetric``

Every setting is read from the resolved run config, so an ``--override`` changes both pipelines.
The method and the recorded figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from benchutil import Measurement, centre_crop_box, median_seconds, release_memory, synchronizer

from unet_trainer.commands.builders import AMP_DTYPES, build_optimizer
from unet_trainer.data.loader import prefetch_batches

MODALITIES = ("flair", "t1", "t1ce", "t2")


def monai_item(phantom: Path, case_id: str) -> dict:
    """A MONAI data dict: the 4 modality files (stacked as channels by LoadImaged) and the label file."""
    folder = phantom / case_id
    return {
        "image": [str(folder / f"{case_id}_{m}.nii.gz") for m in MODALITIES],
        "label": str(folder / f"{case_id}_seg.nii.gz"),
    }


def monai_transforms(cfg: dict):
    """(training Compose, validation Compose) of MONAI transforms matching the config.

    MONAI arrays are (C, X, Y, Z) as NIfTI stores them; ours are (C, Z, Y, X), so the patch is
    reversed. The training Compose's deterministic prefix (up to NormalizeIntensityd) is what
    CacheDataset caches; FgBgToIndicesd is in it so the crop does not search the volume each draw,
    and runs before the z-score, while "inside the head" is still "> 0".
    """
    from monai import transforms as T

    data, aug = cfg["data"], cfg["augmentation"]
    patch = tuple(reversed(data["patch_size"]))
    keys = ["image", "label"]
    load = [
        T.LoadImaged(keys="image"),  # a list of 4 files -> stacked along a new first (channel) axis
        T.LoadImaged(keys="label", dtype=np.uint8, ensure_channel_first=True),
        T.MapLabelValued(keys="label", orig_labels=[0, 1, 2, 4], target_labels=[0, 1, 2, 3], dtype=np.uint8),
        T.CropForegroundd(keys=keys, source_key="image"),
    ]
    normalize = T.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    random: list = [
        T.RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=patch,
            pos=data["oversampling"],
            neg=1.0 - data["oversampling"],
            num_samples=1,
            fg_indices_key="label_fg_indices",
            bg_indices_key="label_bg_indices",
        ),
    ]
    if aug["enabled"]:
        flip_p = aug["flip"]["p"]
        blur = tuple(aug["blur"]["sigma"])
        brightness, contrast = aug["brightness"]["scale"], aug["contrast"]["scale"]
        random += [
            T.RandFlipd(keys=keys, prob=flip_p, spatial_axis=0),
            T.RandFlipd(keys=keys, prob=flip_p, spatial_axis=1),
            T.RandFlipd(keys=keys, prob=flip_p, spatial_axis=2),
            # std ~ U(0, std) per draw (sample_std=True); ours draws U(noise.std).
            T.RandGaussianNoised(keys="image", prob=aug["noise"]["p"], mean=0.0, std=aug["noise"]["std"][1]),
            T.RandGaussianSmoothd(keys="image", prob=aug["blur"]["p"], sigma_x=blur, sigma_y=blur, sigma_z=blur),
            T.RandScaleIntensityd(
                keys="image", prob=aug["brightness"]["p"], factors=(brightness[0] - 1.0, brightness[1] - 1.0)
            ),
            T.RandScaleIntensityFixedMeand(
                keys="image",
                prob=aug["contrast"]["p"],
                factors=(contrast[0] - 1.0, contrast[1] - 1.0),
                fixed_mean=False,
                preserve_range=True,
            ),
        ]
    # Plain tensors to the network, as MONAI recommends for speed (no meta tracking in the model).
    random.append(T.EnsureTyped(keys=keys, track_meta=False))
    train = T.Compose(
        load + [T.FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0), normalize] + random
    )
    val = T.Compose(load + [normalize, T.EnsureTyped(keys=keys, track_meta=False)])
    return train, val


def build_dynunet(model_cfg: dict, notes: list[str]) -> torch.nn.Module:
    """DynUNet with the config's levels; mismatches it cannot express are added to ``notes``."""
    from monai.networks.nets import DynUNet

    norms = {
        "instance": ("INSTANCE", {"affine": True}),
        "batch": ("BATCH", {"affine": True}),
        "group": ("GROUP", {"num_groups": model_cfg["norm_groups"], "affine": True}),
    }
    if model_cfg["norm"] not in norms:
        notes.append(f"model.unet.norm={model_cfg['norm']} has no DynUNet equivalent; DynUNet uses instance norm")
    if model_cfg["upsample"] != "transposed" or model_cfg["downsample"] != "strided_conv":
        notes.append("DynUNet always uses strided-conv downsampling and transposed-conv upsampling")
    if model_cfg["deep_supervision"]:
        notes.append("model.unet.deep_supervision is on for ours; the MONAI reference trains without it")
    act = (
        ("leakyrelu", {"inplace": True, "negative_slope": model_cfg["negative_slope"]})
        if model_cfg["activation"] == "leaky_relu"
        else ("relu", {"inplace": True})
    )
    strides = model_cfg["strides"]
    return DynUNet(
        spatial_dims=model_cfg["spatial_dims"],
        in_channels=model_cfg["in_channels"],
        out_channels=model_cfg["num_classes"],
        kernel_size=model_cfg["kernel_sizes"],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=model_cfg["filters"],
        norm_name=norms.get(model_cfg["norm"], norms["instance"]),
        act_name=act,
        dropout=model_cfg["dropout"] or None,
        deep_supervision=False,
        res_block=model_cfg["residual"],
        trans_bias=False,
    )


def run_monai(
    cfg: dict,
    phantom: Path,
    train_ids: list[str],
    val_id: str,
    dataset_kind: str,
    cache_workers: int,
    microbatch: int | None,
    warmup_steps: int,
    timed_steps: int,
    eval_repeats: int,
    eval_crop: tuple[int, int, int] | None,
) -> Measurement:
    """Train the MONAI reference for ``warmup_steps + timed_steps`` steps, timing the latter, then
    time one sliding-window evaluation of the validation case."""
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    m = Measurement("monai")
    device = torch.device("cuda" if cfg["device"] == "cuda" else "cpu")
    sync = synchronizer(device)
    amp_dtype = AMP_DTYPES[cfg["precision"]]
    batch_size = cfg["train_batch_size"]
    auto = cfg["device_train_microbatch_size"] == "auto"
    micro = microbatch if microbatch is not None else batch_size
    torch.manual_seed(cfg["seed"])

    train_tf, val_tf = monai_transforms(cfg)
    train_tf.set_random_state(seed=cfg["seed"])
    started = time.perf_counter()
    if dataset_kind == "cache":
        pool = list(dict.fromkeys(train_ids))  # the distinct cases, cached once each
        # copy_cache=False: no transform after the cache modifies its input in place (the crop
        # returns a region that the flips, noise, blur and scaling replace rather than overwrite).
        cache = CacheDataset(
            [monai_item(phantom, c) for c in pool],
            train_tf,
            num_workers=cache_workers,
            progress=False,
            copy_cache=False,
        )
        position = {c: i for i, c in enumerate(pool)}
        dataset = cache[[position[c] for c in train_ids]]  # a Subset: one entry per training entry
        m.setup_s[f"CacheDataset fill ({len(pool)} cases)"] = time.perf_counter() - started
    else:
        dataset = Dataset([monai_item(phantom, c) for c in train_ids], train_tf)
    workers = cfg["data"]["num_workers"]
    # The same worker settings as our loader (persistent workers, its batches prefetched per worker,
    # pinned memory on CUDA), so the loaders differ only in what the workers do.
    patch_voxels = math.prod(cfg["data"]["patch_size"])
    batch_bytes = batch_size * patch_voxels * (4 * cfg["model"]["unet"]["in_channels"] + 1)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=cfg["drop_last"],
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_batches(workers, batch_bytes) if workers > 0 else None,
    )

    model = build_dynunet(cfg["model"]["unet"], m.notes).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "amp_fp16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext

    def train_step(image: torch.Tensor, label: torch.Tensor, micro: int) -> torch.Tensor:
        size = image.shape[0]
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for lo in range(0, size, micro):
            hi = min(lo + micro, size)
            with autocast():
                loss = loss_fn(model(image[lo:hi]), label[lo:hi])
            scaled = loss * ((hi - lo) / size)  # the accumulated gradient equals the whole batch's
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss.detach() * ((hi - lo) / size)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return total

    model.train()
    iterator = iter(loader)
    if device.type == "cuda" and warmup_steps == 0:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    last = time.perf_counter()
    for step in range(1, warmup_steps + timed_steps + 1):
        wait_start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:  # a new epoch: a new shuffle, as DataLoader epochs go
            iterator = iter(loader)
            batch = next(iterator)
        wait = time.perf_counter() - wait_start
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        while True:
            try:
                loss = train_step(image, label, micro)
                break
            except torch.cuda.OutOfMemoryError:
                # The same policy as ours' "auto": halve the microbatch and retry the same batch.
                if not auto or micro <= 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                micro = max(1, micro // 2)
        # One host read of the loss per step, as a MONAI training loop logs it.
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"MONAI reference: loss became {value} at step {step}")
        sync()
        now = time.perf_counter()
        if step > warmup_steps:
            m.record(now - last, wait, image.shape[0])
            if device.type == "cuda":
                m.peak_bytes = torch.cuda.max_memory_allocated(device)
        elif step == warmup_steps and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        last = now
    m.microbatch = micro
    del iterator, loader, dataset, batch, image, label
    gc.collect()
    if eval_crop is None:  # --skip-eval
        del model, optimizer
        release_memory(device)
        return m

    # One sliding-window evaluation of the validation case (loaded beforehand: MONAI validation
    # loops keep it in a CacheDataset), with argmax and Dice per tumour label.
    item = val_tf(monai_item(phantom, val_id))
    val_image = item["image"][None].to(device)
    val_label = item["label"][None].to(device)
    classes = cfg["model"]["unet"]["num_classes"]
    roi = tuple(reversed(cfg["data"]["patch_size"]))
    mode = "gaussian" if cfg["eval"]["gaussian"] else "constant"
    model.eval()

    def evaluate() -> None:
        with torch.no_grad(), autocast():
            logits = sliding_window_inference(
                val_image,
                roi,
                cfg["eval"]["sw_batch_size"],
                model,
                overlap=cfg["eval"]["overlap"],
                mode=mode,
                sigma_scale=0.125,
            )
        pred = one_hot(logits.float().argmax(1, keepdim=True), classes, dim=1)
        DiceMetric(include_background=False, reduction="mean_batch")(pred, one_hot(val_label, classes, dim=1))

    evaluate()  # warm-up: cuDNN plans and allocator for the evaluation shapes
    m.eval_case_s = median_seconds(evaluate, device, 0, eval_repeats)
    # The same BraTS-sized centre box as ours; MONAI's arrays are (C, X, Y, Z), so the box is reversed.
    box = centre_crop_box(tuple(val_image.shape[2:]), tuple(reversed(eval_crop)))
    val_image = val_image[(slice(None), slice(None)) + box].contiguous()
    val_label = val_label[(slice(None), slice(None)) + box].contiguous()
    m.eval_crop_shape = list(reversed(val_image.shape[2:]))
    evaluate()
    m.eval_crop_s = median_seconds(evaluate, device, 0, eval_repeats)
    del model, optimizer, val_image, val_label
    release_memory(device)
    return m
