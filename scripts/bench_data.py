#!/usr/bin/env python
"""Data-pipeline throughput at BraTS size: preparation, our patch loader, and MONAI on the same data.

Phantom cases of the full BraTS array size (4, 155, 240, 240) are written once in the BraTS 2021
layout under ``--work`` (reruns reuse them; generating one takes a few seconds) and then measured:

(a) prepare   ``prepare_dataset`` into a fresh folder: cases/s with ``--prepare-workers`` processes
              (read + decompress four modalities and the segmentation, validate, crop to the
              nonzero box, z-score, write memory-mappable .npy files).
(b) ours      ``PatchDataset`` + ``build_train_loader`` (the training loader): 128^3 patches,
              oversampling 0.4, batch 2, ``--workers`` processes. Per patch a worker picks the
              origin and copies a 128^3 crop out of the memory-mapped prepared arrays.
(d) MONAI     the same work on the same raw NIfTI files through ``monai.data.DataLoader`` with the
              same workers and batch: LoadImaged (the four modality files of a case as one
              4-channel image) -> NormalizeIntensityd(nonzero, channel-wise) -> FgBgToIndicesd ->
              RandCropByPosNegLabeld(128^3, pos 0.4, neg 0.6, one sample) -> SelectItemsd.
                * Dataset: every patch decompresses and normalises the whole case again.
                * CacheDataset (second reference, run when it fits in half the available RAM):
                  load + normalise + foreground/background indices are computed once per case
                  and kept in RAM (copy_cache=False: the crop does not modify the cache); a patch
                  is then one random crop. Filling the cache is timed separately.
              Both use persistent workers, as ours does.
(b') ceiling  the same DataLoader settings serving one constant pre-built patch: no reading or
              cropping at all, only PyTorch's batching and worker-to-main transport (each batch is
              stacked into fresh shared memory). Ours cannot beat this; how close it gets shows
              what is left to gain in the crop itself.
(c) memory    peak proportional set size (PSS: shared pages split between the processes that map
              them) of this process and all its workers, sampled from /proc every 0.1 s during
              each measurement; plus ``ru_maxrss`` of this process and of its largest child.

Loader rates are steady state: the first ``--warmup`` batches (worker start-up, first reads) are
not timed; then ``--iters`` batches are (ours, the ceiling, MONAI CacheDataset), or
``--monai-iters`` for the slow MONAI Dataset, crossing epoch boundaries as training does (8 cases
= 4 batches of 2 per epoch). On a machine shared with other work the rates move with its load;
the load average at the start is printed. The headline ratio is ours /
MONAI Dataset, the target's reference ("the loader alone delivers at least 2x MONAI's patches/s
with the same number of workers"); the ratio to CacheDataset is printed too.

Examples:
    python scripts/bench_data.py                                   # defaults, ~3 min on 2 CPU cores
    python scripts/bench_data.py --cases 4 --shape 96 128 128 --patch 64 --iters 10 --monai-iters 4
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import cpu_model_name

from unet_trainer.data.layouts import CaseFiles, list_cases, open_dataset, write_case  # noqa: E402
from unet_trainer.data.loader import PatchDataset, build_train_loader  # noqa: E402
from unet_trainer.data.phantom import make_phantom_case  # noqa: E402
from unet_trainer.data.prepare import prepare_dataset  # noqa: E402

CASE_PREFIX = "BraTS2021_"


# --------------------------------------------------------------------------------------------
# Machine and memory
# --------------------------------------------------------------------------------------------


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/<pid>/task/<tid>/children."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    stack.extend(int(child) for child in children.read().split())
        except OSError:
            continue  # the process ended while we looked
    return pids


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakTreeMemory:
    """Peak PSS (bytes) of this process plus its descendants, sampled in a thread.

    PSS counts a page shared by k processes as 1/k in each, so the sum over the workers is the
    memory the pipeline really holds (memory-mapped page-cache pages included, once). Without
    /proc (not Linux) it reads 0.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        return sum(_pss_bytes(pid) for pid in _process_tree(os.getpid()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _write_phantom_case(args: tuple[str, int, tuple[int, int, int], int]) -> str:
    pool, index, shape, seed = args
    case_id = f"{CASE_PREFIX}{index:05d}"
    image, label = make_phantom_case(shape, np.random.default_rng([seed, index]))
    # write_case writes the four modalities, then the segmentation, each atomically: a case
    # whose segmentation exists is complete.
    write_case(Path(pool), "brats2021", case_id, image, label, np.eye(4))
    return case_id


def ensure_raw_dataset(
    work: Path, cases: int, shape: tuple[int, int, int], seed: int, workers: int
) -> tuple[Path, float]:
    """A BraTS 2021 folder of exactly ``cases`` phantom cases; returns (folder, seconds spent generating).

    Cases live in ``work/pool-<shape>-seed<seed>/`` and are generated only once; the returned folder
    holds symbolic links to the first ``cases`` of them, so runs with fewer cases reuse them.
    """
    tag = f"{'x'.join(map(str, shape))}-seed{seed}"
    pool = work / f"pool-{tag}"
    pool.mkdir(parents=True, exist_ok=True)
    missing = [
        i for i in range(cases) if not (pool / f"{CASE_PREFIX}{i:05d}" / f"{CASE_PREFIX}{i:05d}_seg.nii.gz").is_file()
    ]
    start = time.perf_counter()
    if missing:
        print(f"generating {len(missing)} phantom case(s) of {shape} into {pool} ...", flush=True)
        jobs = [(str(pool), i, shape, seed) for i in missing]
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as executor:
                list(executor.map(_write_phantom_case, jobs))
        else:
            for job in jobs:
                _write_phantom_case(job)
    generated = time.perf_counter() - start
    raw = work / f"raw-{tag}-{cases}cases"
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir()
    for i in range(cases):
        (raw / f"{CASE_PREFIX}{i:05d}").symlink_to(pool / f"{CASE_PREFIX}{i:05d}", target_is_directory=True)
    return raw, generated if missing else 0.0


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def endless_batches(loader, set_epoch: Callable[[int], None] | None) -> Iterator:
    """Batches across epochs, as a training loop draws them."""
    epoch = 0
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        yield from loader
        epoch += 1


def time_loader(
    batches: Iterator, warmup: int, iters: int, unpack: Callable[[object], tuple[torch.Tensor, torch.Tensor]]
) -> dict:
    """Draw ``warmup`` untimed then ``iters`` timed batches.

    Returns:
        dict with patches_per_s (timed part), startup_s (until the warm-up batches arrived),
        tumour_fraction (share of timed patches holding any tumour voxel) and patch_shape.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    first = time.perf_counter()
    patches = tumour = 0
    shape = None
    for _ in range(iters):
        image, label = unpack(next(batches))
        patches += image.shape[0]
        tumour += int((label.reshape(label.shape[0], -1) > 0).any(dim=1).sum())
        shape = tuple(image.shape[1:])
    elapsed = time.perf_counter() - first
    return {
        "patches_per_s": patches / elapsed,
        "startup_s": first - start,
        "patches": patches,
        "seconds": elapsed,
        "tumour_fraction": tumour / max(patches, 1),
        "patch_shape": shape,
    }


def run_ours(prepared: Path, case_ids: list[str], args) -> dict:
    dataset = PatchDataset(prepared, case_ids, (args.patch,) * 3, args.oversampling)
    loader = build_train_loader(dataset, args.batch, args.seed, args.workers, pin_memory=False)
    batches = iter(loader)  # our loader runs across epochs by itself
    try:
        return time_loader(batches, args.warmup, args.iters, lambda batch: (batch[0], batch[1]))
    finally:
        del batches, loader  # ends the persistent workers before the next measurement
        gc.collect()


class _ConstantPatches(torch.utils.data.Dataset):
    """Serves one pre-built (image, label) patch for every key: measures the transport alone."""

    def __init__(self, patch: int, length: int) -> None:
        self.image = torch.zeros((4, patch, patch, patch), dtype=torch.float32)
        self.label = torch.zeros((1, patch, patch, patch), dtype=torch.uint8)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image, self.label


def run_ceiling(num_cases: int, args) -> dict:
    """Our loader's settings (sampler, workers, prefetch) over :class:`_ConstantPatches`."""
    loader = build_train_loader(
        _ConstantPatches(args.patch, num_cases), args.batch, args.seed, args.workers, pin_memory=False
    )
    batches = iter(loader)
    try:
        return time_loader(batches, args.warmup, args.iters, lambda batch: (batch[0], batch[1]))
    finally:
        del batches, loader
        gc.collect()


def monai_items(cases: list[CaseFiles]) -> list[dict]:
    # CaseFiles.images are already in canonical channel order (flair, t1, t1ce, t2).
    return [{"image": [str(p) for p in case.images], "label": str(case.label)} for case in cases]


def monai_transform(args):
    from monai.transforms import (
        Compose,
        FgBgToIndicesd,
        LoadImaged,
        NormalizeIntensityd,
        RandCropByPosNegLabeld,
        SelectItemsd,
    )

    return Compose(
        [
            # A list of files under one key is stacked as channels: image (4, X, Y, Z), label (1, X, Y, Z).
            LoadImaged(keys=["image", "label"], ensure_channel_first=True),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            FgBgToIndicesd(keys="label"),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=(args.patch,) * 3,
                pos=args.oversampling,
                neg=1.0 - args.oversampling,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
            # The index arrays are whole-volume sized; they must not travel to the main process.
            SelectItemsd(keys=["image", "label"]),
        ]
    )


def run_monai(dataset, iters: int, args) -> dict:
    from monai.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    batches = endless_batches(loader, None)
    try:
        return time_loader(
            batches, args.warmup, iters, lambda batch: (batch["image"].as_tensor(), batch["label"].as_tensor())
        )
    finally:
        batches.close()
        del loader
        gc.collect()


def cache_bytes_estimate(shape: tuple[int, int, int], cases: int) -> int:
    voxels = int(np.prod(shape))
    # float32 image (4 channels) and label, plus int64 background indices (most of the volume).
    return cases * voxels * (4 * 4 + 4 + 8)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8, help="phantom cases (default 8)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[155, 240, 240],
        metavar=("Z", "Y", "X"),
        help="case array shape (default 155 240 240, BraTS)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/unet-bench-data"),
        help="folder for the cached phantom and the prepared copy (default /tmp/unet-bench-data)",
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, ours and MONAI (default 2)")
    parser.add_argument("--prepare-workers", type=int, default=2, help="preparation processes (default 2)")
    parser.add_argument("--patch", type=int, default=128, help="cubic patch edge (default 128)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--oversampling", type=float, default=0.4, help="tumour-centred share (default 0.4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per loader (default 2)")
    parser.add_argument(
        "--iters",
        type=int,
        default=40,
        help="timed batches of our loader, the ceiling and MONAI CacheDataset (default 40)",
    )
    parser.add_argument("--monai-iters", type=int, default=8, help="timed batches of MONAI Dataset (default 8)")
    parser.add_argument("--no-monai", action="store_true", help="measure preparation and our loader only")
    parser.add_argument("--no-cache-dataset", action="store_true", help="skip the MONAI CacheDataset reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cases < 1 or args.workers < 0 or args.prepare_workers < 1 or args.batch < 1:
        parser.error("--cases, --prepare-workers and --batch must be at least 1, --workers at least 0")
    if args.iters < 1 or args.monai_iters < 1 or args.warmup < 0:
        parser.error("--iters and --monai-iters must be at least 1, --warmup at least 0")
    if min(args.shape) < 24:
        parser.error("--shape: every dimension must be at least 24 (the phantom needs room for a head)")
    if args.patch > min(args.shape):
        # MONAI's crop cannot return a patch larger than the volume (ours would pad it).
        parser.error(f"--patch {args.patch} is larger than the smallest --shape dimension {min(args.shape)}")
    if not 0.0 <= args.oversampling <= 1.0:
        parser.error("--oversampling must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    shape = tuple(args.shape)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version, args.no_monai = "not installed", True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_model_name()}, {cores} cores usable, load average {os.getloadavg()[0]:.2f} at start")
    print(
        f"torch {torch.__version__}, MONAI {monai_version}, numpy {np.__version__}, Python {platform.python_version()}"
    )
    print(
        f"{args.cases} phantom cases of (4, {', '.join(map(str, shape))}), patch {args.patch}^3, batch {args.batch}, "
        f"oversampling {args.oversampling}, {args.workers} loader workers"
    )

    raw, generated = ensure_raw_dataset(args.work, args.cases, shape, args.seed, args.prepare_workers)
    if generated:
        print(f"generated the phantom in {generated:.1f} s (cached for reruns)")

    # (a) preparation, into a fresh folder each run.
    prepared = args.work / f"prepared-{'x'.join(map(str, shape))}-{args.cases}cases"
    if prepared.exists():
        shutil.rmtree(prepared)
    with PeakTreeMemory() as memory:
        start = time.perf_counter()
        record = prepare_dataset(open_dataset(raw), prepared, workers=args.prepare_workers, progress=False)
        prepare_s = time.perf_counter() - start
    case_ids = record["cases"]
    prepared_bytes = sum(p.stat().st_size for p in prepared.glob("*_x.npy"))
    print(
        f"\n(a) prepare: {len(case_ids) / prepare_s:.2f} cases/s ({len(case_ids)} cases in {prepare_s:.1f} s, "
        f"{args.prepare_workers} processes); prepared images {gib(prepared_bytes)}; peak PSS {gib(memory.peak)}"
    )

    # (b) our loader.
    with PeakTreeMemory() as memory:
        ours = run_ours(prepared, case_ids, args)
    print(
        f"(b) ours:  {ours['patches_per_s']:7.2f} patches/s  ({ours['patches']} patches in {ours['seconds']:.1f} s; "
        f"start-up {ours['startup_s']:.1f} s; {ours['tumour_fraction']:.0%} hold tumour; peak PSS {gib(memory.peak)})"
    )
    print(f"           per patch: pick an origin, copy a {args.patch}^3 crop out of the memory-mapped prepared arrays")

    ceiling = run_ceiling(len(case_ids), args)
    print(
        f"(b') DataLoader ceiling: {ceiling['patches_per_s']:7.2f} patches/s  (constant patch, no reading: "
        f"ours reaches {ours['patches_per_s'] / ceiling['patches_per_s']:.0%} of PyTorch's batch transport)"
    )

    results = {"ours": ours}
    if not args.no_monai:
        from monai.data import CacheDataset, Dataset

        items = monai_items(list_cases(raw))
        transform = monai_transform(args)
        with PeakTreeMemory() as memory:
            plain = run_monai(Dataset(items, transform), args.monai_iters, args)
        results["monai"] = plain
        print(
            f"(d) MONAI Dataset:      {plain['patches_per_s']:7.2f} patches/s  ({plain['patches']} patches in "
            f"{plain['seconds']:.1f} s; start-up {plain['startup_s']:.1f} s; {plain['tumour_fraction']:.0%} hold tumour; "
            f"peak PSS {gib(memory.peak)})"
        )
        print(
            "           per patch: decompress the 5 NIfTI files of the case, normalise all 4 channels, "
            "find foreground/background voxels, crop"
        )
        available = available_memory_bytes()
        need = cache_bytes_estimate(shape, len(items))
        if args.no_cache_dataset:
            print("(d) MONAI CacheDataset: not run (--no-cache-dataset)")
        elif available is not None and need > available / 2:
            print(f"(d) MONAI CacheDataset: skipped, needs about {gib(need)} and {gib(available)} is available")
        else:
            with PeakTreeMemory() as memory:
                start = time.perf_counter()
                cached = CacheDataset(
                    items, transform, num_workers=max(args.workers, 1), copy_cache=False, progress=False
                )
                fill_s = time.perf_counter() - start
                cache = run_monai(cached, args.iters, args)
            del cached
            gc.collect()
            results["monai_cache"] = cache
            print(
                f"(d) MONAI CacheDataset: {cache['patches_per_s']:7.2f} patches/s  ({cache['patches']} patches in "
                f"{cache['seconds']:.1f} s; cache filled in {fill_s:.1f} s; {cache['tumour_fraction']:.0%} hold tumour; "
                f"peak PSS {gib(memory.peak)})"
            )
            print(
                "           per patch: one random crop of the cached normalised volume "
                "(the whole raw volumes stay in RAM, not cropped to the head)"
            )

    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        f"(c) ru_maxrss: this process {gib(self_kib * 1024)}, largest child {gib(child_kib * 1024)} "
        f"(per-measurement peaks are the PSS figures above)"
    )

    if "monai" in results:
        ratio = ours["patches_per_s"] / results["monai"]["patches_per_s"]
        verdict = "meets" if ratio >= 2 else "MISSES"
        print(
            f"\nratio ours / MONAI Dataset = {ratio:.1f}x with {args.workers} workers "
            f"({verdict} the target of >= 2x; this is the ratio the target uses)"
        )
        if "monai_cache" in results:
            print(
                f"ratio ours / MONAI CacheDataset = {ours['patches_per_s'] / results['monai_cache']['patches_per_s']:.1f}x "
                "(second reference)"
            )


if __name__ == "__main__":
    main()
