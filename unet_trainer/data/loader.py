"""Patch loading from prepared, memory-mapped cases.

DataLoader workers only read and crop; augmentation runs batched on the training device
(:mod:`unet_trainer.training.augment`). One epoch visits every training case once, one random patch
each, or draws a fixed number of cases with replacement (``data.batches_per_epoch``, as nnU-Net does). Randomness is keyed by (seed, epoch, position in the epoch), never by worker, so the
batches are identical whatever the number of workers, and a resumed run picks up mid-epoch
with exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler

from ..core.fileio import size_text

# The most bytes of finished batches the loader's workers may hold ahead of the trainer. Each
# worker builds whole batches, and DataLoader keeps prefetch_factor x num_workers of them in shared
# memory (and as many pinned copies): at BraTS size a batch of 64 patches of 4x128^3 float32 is
# 2.1 GiB, so 8 workers x 4 would hold 69 GiB, more than the /dev/shm of a 128 GiB machine.
PREFETCH_BYTES = 8 * 2**30


# Where DataLoader's workers put the batches they hand over (POSIX shared memory on Linux).
SHARED_MEMORY = Path("/dev/shm")


class BatchTooLarge(ValueError):
    """One training batch is more than this machine can hold; the message says how much it needs
    and what there is (the caller names the settings)."""


class SharedMemoryExhausted(RuntimeError):
    """A loader worker found no room in shared memory for a batch (one line naming the file system).

    DataLoader re-raises a worker's error in the main process as ``type(error)(text)``, where the
    text is the worker's whole traceback; its last line is the worker's own message, and that is
    what ``str()`` gives.
    """

    def __str__(self) -> str:
        lines = super().__str__().strip().splitlines() or [""]
        return lines[-1].removeprefix(f"{type(self).__module__}.{type(self).__qualname__}: ")


def shared_memory_free(folder: Path = SHARED_MEMORY) -> int | None:
    """Bytes free in the shared-memory file system, None where there is none (not Linux)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def memory_available() -> int | None:
    """Bytes of memory available without swapping (``MemAvailable`` of /proc/meminfo, lowered to
    what a cgroup v2 memory limit leaves); None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            # memory.current counts the page cache too; its inactive part is reclaimed on demand
            # (the working set, as container runtimes count it), so it is not in use.
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            stat = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines())
            used -= int(stat.get("inactive_file", 0))
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def check_batch_fits(batch_bytes: int, num_workers: int, processes: int = 1) -> None:
    """Refuse a batch this machine cannot hold, before any is built.

    A batch is assembled from its samples (both in memory at once, so twice its size); each of
    ``num_workers`` loader workers then holds the batch it built in shared memory until the
    trainer takes it, and they start together. ``processes`` training processes on this machine
    (torchrun's ranks) share both.

    Raises:
        BatchTooLarge: the batches need more shared memory than is free, or more memory than is
            available.
    """
    shared = shared_memory_free() if num_workers > 0 else None
    needed = processes * num_workers * batch_bytes
    if shared is not None and needed > shared:
        holders = f"{num_workers} loader worker(s)" + (f" in each of {processes} processes" if processes > 1 else "")
        raise BatchTooLarge(
            f"a batch is {size_text(batch_bytes)} and the {holders} hold one each in shared memory, "
            f"{size_text(needed)}, but {SHARED_MEMORY} has {size_text(shared)} free"
        )
    available = memory_available()
    needed = processes * 2 * batch_bytes
    if available is not None and needed > available:
        raise BatchTooLarge(
            f"a batch is {size_text(batch_bytes)}, assembling it takes {size_text(needed)} of memory "
            f"(samples and batch{f', in each of {processes} processes' if processes > 1 else ''}), "
            f"but {size_text(available)} is available"
        )


def _remove_leaked_shared_memory() -> None:
    """Delete the shared-memory files this process created and did not unlink. Under the
    ``file_descriptor`` strategy torch unlinks each file as soon as it is mapped, so a file still
    named after this process is one a failed allocation left behind (it is never freed otherwise:
    a 64 GiB sparse file of a batch that did not fit stays in /dev/shm until reboot)."""
    if torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return
    for leaked in SHARED_MEMORY.glob(f"torch_{os.getpid()}_*"):
        leaked.unlink(missing_ok=True)


# Set in a loader worker once its batch found no room in shared memory (see below).
_out_of_shared_memory = False


def collate_in_shared_memory(samples: list) -> object:
    """DataLoader's default collation (into shared memory, in a worker), leaving no file behind
    when the allocation fails.

    Raises:
        SharedMemoryExhausted: no room for the batch in shared memory.
    """
    global _out_of_shared_memory
    if _out_of_shared_memory:
        # The worker goes on to its prefetched batches after the first failure, while the main process
        # shuts it down: one more allocation could be killed half-way and leave its file behind.
        raise _no_room(samples)
    try:
        return default_collate(samples)
    except RuntimeError as exc:
        if torch.utils.data.get_worker_info() is None:  # the main process collates in plain memory
            raise
        _remove_leaked_shared_memory()
        if "shared memory" not in str(exc) and "/torch_" not in str(exc):
            raise
        _out_of_shared_memory = True
        raise _no_room(samples) from None


def _no_room(samples: list) -> SharedMemoryExhausted:
    """The one-line error for a batch of ``samples`` that found no room in shared memory."""
    batch_bytes = sum(t.nbytes for sample in samples for t in sample if isinstance(t, torch.Tensor))
    return SharedMemoryExhausted(
        f"{SHARED_MEMORY}: no room for a batch of {size_text(batch_bytes)} from a data loader worker "
        f"({size_text(shared_memory_free() or 0)} free); lower data.num_workers, data.patch_size or "
        "train_batch_size, or free shared memory"
    )


def prefetch_batches(num_workers: int, batch_bytes: int, budget_bytes: int = PREFETCH_BYTES) -> int:
    """DataLoader's ``prefetch_factor``: 4 batches per worker when they fit in ``budget_bytes``,
    fewer for big batches, at least 1 (``num_workers`` batches in flight, which already outpace a
    GPU step at BraTS size)."""
    return max(1, min(4, budget_bytes // max(1, num_workers * batch_bytes)))


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The crop seed of the sample at ``position`` of ``epoch`` (independent of workers and ranks)."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class PreparedCase:
    """Lazy, memory-mapped access to one prepared case (image, label, foreground voxels, metadata)."""

    def __init__(self, folder: Path, case_id: str):
        self.folder, self.case_id = Path(folder), case_id
        self._image = self._label = self._foreground = None
        self.meta = json.loads((self.folder / f"{case_id}_meta.json").read_text())

    @property
    def image(self) -> np.ndarray:
        """float32 (C, Z, Y, X), memory-mapped."""
        if self._image is None:
            self._image = np.load(self.folder / f"{self.case_id}_x.npy", mmap_mode="r", allow_pickle=False)
        return self._image

    @property
    def label(self) -> np.ndarray:
        """uint8 (Z, Y, X) canonical labels, memory-mapped."""
        if self._label is None:
            self._label = np.load(self.folder / f"{self.case_id}_y.npy", mmap_mode="r", allow_pickle=False)
        return self._label

    @property
    def foreground(self) -> np.ndarray:
        """int32 (N, 4) rows of (label, z, y, x) of sampled tumour voxels."""
        if self._foreground is None:
            self._foreground = np.load(self.folder / f"{self.case_id}_fg.npy", allow_pickle=False)
        return self._foreground


def crop_with_padding(
    image: np.ndarray, label: np.ndarray, start: Sequence[int], patch: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``patch`` voxels starting at ``start`` (may be negative or overhang); pad with zeros.

    Args:
        image: (C, Z, Y, X) array (a memmap is read only where needed).
        label: (Z, Y, X).
        start: first voxel per spatial axis; the patch may extend past either border.
        patch: patch size per spatial axis.

    Returns:
        image (C, *patch) float32 and label (1, *patch) uint8; outside the volume is 0.
    """
    spatial = image.shape[1:]
    src, dst = [], []
    for s, p, n in zip(start, patch, spatial):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out_image = np.zeros((image.shape[0],) + tuple(patch), np.float32)
    out_label = np.zeros((1,) + tuple(patch), np.uint8)
    out_image[(slice(None),) + tuple(dst)] = image[(slice(None),) + tuple(src)]
    out_label[(0,) + tuple(dst)] = label[tuple(src)]
    return out_image, out_label


def choose_patch_start(
    shape: Sequence[int],
    patch: Sequence[int],
    rng: np.random.Generator,
    foreground: np.ndarray | None,
    oversampling: float,
) -> list[int]:
    """Pick the patch origin: with probability ``oversampling`` centred on a tumour voxel.

    An oversampled patch picks a tumour label uniformly among those present (so a small
    enhancing rim is drawn as often as a large oedema), then a random voxel of that label, and
    centres the patch there, shifted to stay inside the volume where the volume allows. A volume
    smaller than the patch on an axis is centred in the patch (and padded by the caller).
    """
    centre = None
    if oversampling > 0 and foreground is not None and len(foreground) and rng.random() < oversampling:
        labels = np.unique(foreground[:, 0])
        chosen = labels[rng.integers(len(labels))]
        rows = np.flatnonzero(foreground[:, 0] == chosen)
        centre = foreground[rows[rng.integers(len(rows))], 1:]
    start = []
    for axis, (n, p) in enumerate(zip(shape, patch)):
        if n <= p:
            start.append(-((p - n) // 2))
        elif centre is not None:
            start.append(int(np.clip(centre[axis] - p // 2, 0, n - p)))
        else:
            start.append(int(rng.integers(0, n - p + 1)))
    return start


class PatchDataset(Dataset):
    """Random patches from prepared cases; indexed by ``(case_index, crop_seed)`` pairs.

    Args:
        folder: the prepared folder.
        case_ids: the cases this dataset draws from (e.g. the training fold).
        patch_size: (Z, Y, X) patch; a leading 1 with ``squeeze_slice_axis`` gives 2D slices.
        oversampling: probability that a patch is centred on a tumour voxel.
        squeeze_slice_axis: drop the leading size-1 axis, for 2D models.
        sampled_size: (Z, Y, X) of the region cut around each patch, ``>= patch_size`` by an even
            number of voxels per axis (for a transform that resamples, e.g. rotates); None cuts the
            patch. The patch's position is drawn as without it, so the region's centre is the patch's.

    Items are ``(image, label)`` tensors: image float32 (C, *S) and label uint8 (1, *S), where S is
    the sampled size (the patch unless given) without its slice axis when squeezed.

    Raises:
        ValueError: a 2D patch without a leading 1, or a sampled size smaller than the patch or
            larger by an odd number of voxels.
    """

    def __init__(
        self,
        folder: Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        oversampling: float,
        squeeze_slice_axis: bool = False,
        sampled_size: Sequence[int] | None = None,
    ):
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sampled_size = self.patch_size if sampled_size is None else tuple(int(s) for s in sampled_size)
        if len(self.sampled_size) != len(self.patch_size) or any(
            s < p or (s - p) % 2 for s, p in zip(self.sampled_size, self.patch_size)
        ):
            raise ValueError(
                f"sampled_size {self.sampled_size} must exceed patch_size {self.patch_size} by an even number per axis"
            )
        self.oversampling = float(oversampling)
        self.squeeze_slice_axis = squeeze_slice_axis
        if squeeze_slice_axis and self.patch_size[0] != 1:
            raise ValueError(f"2D patches need a leading 1 in patch_size, got {self.patch_size}")
        self._cases: dict[int, PreparedCase] = {}

    def __len__(self) -> int:
        return len(self.case_ids)

    def sample_bytes(self) -> int:
        """Bytes of one item (float32 image of the first case's channels and a uint8 label)."""
        if not self.case_ids:
            return 0
        # A throwaway handle: cached ones would travel to the workers with the dataset.
        channels = PreparedCase(self.folder, self.case_ids[0]).image.shape[0]
        return math.prod(self.sampled_size) * (4 * channels + 1)

    def case(self, index: int) -> PreparedCase:
        if index not in self._cases:  # opened lazily in each worker
            self._cases[index] = PreparedCase(self.folder, self.case_ids[index])
        return self._cases[index]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        case = self.case(index)
        rng = np.random.default_rng(seed)
        start = choose_patch_start(case.image.shape[1:], self.patch_size, rng, case.foreground, self.oversampling)
        start = [
            first - (sampled - patch) // 2 for first, sampled, patch in zip(start, self.sampled_size, self.patch_size)
        ]
        image, label = crop_with_padding(case.image, case.label, start, self.sampled_size)
        if self.squeeze_slice_axis:
            image, label = image[:, 0], label[:, 0]
        return torch.from_numpy(image), torch.from_numpy(label)


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields ``(case_index, crop_seed)`` and can start mid-epoch.

    Each rank gets its share of the epoch; ``set_epoch`` picks the epoch's cases and ``set_start``
    skips the samples this rank already consumed (for exact resume). By default an epoch is a
    shuffled pass over every case. With ``samples_per_epoch``, an epoch is that many cases drawn
    uniformly with replacement (nnU-Net's epoch of a fixed number of batches, whatever the number of
    cases), keyed by (seed, epoch) like the shuffle, so it is the same on every rank and on resume.
    """

    def __init__(
        self, num_cases: int, seed: int, num_replicas: int = 1, rank: int = 0, samples_per_epoch: int | None = None
    ):
        super().__init__(
            range(num_cases), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.num_cases = num_cases
        self.samples_per_epoch = samples_per_epoch
        if samples_per_epoch is not None:
            self.num_samples = math.ceil(samples_per_epoch / num_replicas)
            self.total_size = self.num_samples * num_replicas
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        self.start = int(start)

    def _epoch_cases(self) -> list[int]:
        """This rank's share of the current epoch's case indices, in order."""
        if self.samples_per_epoch is None:
            return list(super().__iter__())
        drawn = np.random.default_rng([self.seed, self.epoch]).integers(0, self.num_cases, size=self.total_size)
        return drawn[self.rank : self.total_size : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for local, index in enumerate(self._epoch_cases()):
            if local < self.start:
                continue
            position = local * self.num_replicas + self.rank
            yield index, sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class ContinuousBatchSampler:
    """Batches of ``(case_index, crop_seed)`` for one rank, epoch after epoch without a break.

    Each epoch is the :class:`EpochSampler`'s permutation cut into batches of ``batch_size``
    (the last one partial, or dropped with ``drop_last``), exactly as a per-epoch DataLoader would
    cut it. Running on across epochs lets the DataLoader's workers prefetch the next epoch's first
    batches while the current epoch ends, instead of draining and refilling at every boundary (an
    epoch of 387 cases is only 7 steps at batch 64). ``set_position`` chooses where the next
    iteration starts, for resume.

    ``drop_last`` keeps every batch at ``batch_size`` (387 cases at batch 64: 6 steps, 3 samples
    left out), so a CUDA graph or a compiled graph sees one shape. The permutation changes every
    epoch, so the samples left out differ from epoch to epoch.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool = False):
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.batch_in_epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.sampler.num_samples // self.batch_size
        return math.ceil(self.sampler.num_samples / self.batch_size)

    def set_position(self, epoch: int, batch_in_epoch: int) -> None:
        """Start the next iteration at batch ``batch_in_epoch`` of ``epoch``."""
        self.epoch, self.batch_in_epoch = int(epoch), int(batch_in_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.epoch, self.batch_in_epoch
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(skip * self.batch_size)
            batch: list[tuple[int, int]] = []
            for item in self.sampler:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch and not self.drop_last:
                yield batch
            epoch, skip = epoch + 1, 0


def build_train_loader(
    dataset: PatchDataset,
    batch_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    processes: int = 1,
    samples_per_epoch: int | None = None,
) -> DataLoader:
    """An endless DataLoader of training patches for one rank, running across epochs.

    Args:
        batch_size: samples per batch on this rank (the global batch divided by the world size).
        num_workers: reading processes; 0 reads in the main process.
        pin_memory: pin host memory for faster, asynchronous copies to a GPU.
        drop_last: leave out each epoch's last partial batch (every batch then has ``batch_size``).
        samples_per_epoch: an epoch of this many cases drawn with replacement (all ranks together),
            instead of a pass over every case (:class:`EpochSampler`).

    Returns:
        A DataLoader whose ``batch_sampler`` is a :class:`ContinuousBatchSampler`: call its
        ``set_position(epoch, batch_in_epoch)`` before iterating; the caller counts epochs.

    Raises:
        ValueError: ``drop_last`` with fewer samples per rank than ``batch_size`` (no batch would be left).
        BatchTooLarge: a batch needs more memory or shared memory than this machine has
            (:func:`check_batch_fits`; ``processes`` training processes run on it).
    """
    sampler = EpochSampler(
        len(dataset), seed, num_replicas=num_replicas, rank=rank, samples_per_epoch=samples_per_epoch
    )
    if drop_last and sampler.num_samples < batch_size:
        raise ValueError(
            f"drop_last: an epoch has {sampler.num_samples} samples per rank, fewer than the batch of "
            f"{batch_size} per rank, so every batch would be dropped; set drop_last=false or a smaller "
            "train_batch_size"
        )
    # The largest batch there will be: a batch is cut from one epoch's samples.
    batch_bytes = min(batch_size, sampler.num_samples) * dataset.sample_bytes()
    check_batch_fits(batch_bytes, num_workers, processes)
    prefetch = prefetch_batches(num_workers, batch_bytes) if num_workers > 0 else None
    return DataLoader(
        dataset,
        batch_sampler=ContinuousBatchSampler(sampler, batch_size, drop_last),
        num_workers=num_workers,
        collate_fn=collate_in_shared_memory,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch,
    )
