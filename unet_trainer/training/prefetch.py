"""Batches moved to the training device one step ahead (a side-stream copy on CUDA): the training loop's
end of the data path, a leaf (nothing from the package), so the loop needs no part of the loaders.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class DevicePrefetcher:
    """Yields ``(image, label)`` batches already on ``device``, one batch ahead.

    On CUDA the next batch is copied from pinned memory on a side stream while the current step
    computes, so the host-to-device copy (2 GiB for 64 patches of 4x128^3 float32) overlaps the
    step instead of idling the GPU before it. The compute stream waits for the copy before it
    uses the batch, and the tensors are marked as used by it so their memory is not reused early.
    On the CPU it only moves the batches.

    Args:
        batches: an iterator of (image, label) CPU tensors (pinned for a real overlap).
        device: the training device.
        enabled: when False, each batch is copied when it is asked for (no side stream).
    """

    def __init__(self, batches: Iterator, device: torch.device, enabled: bool = True):
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.ready: tuple[torch.Tensor, torch.Tensor] | None = None
        self.exhausted = False

    def _load_next(self) -> None:
        try:
            image, label = next(self.batches)
        except StopIteration:
            self.ready, self.exhausted = None, True
            return
        if self.stream is None:
            self.ready = (image.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True))
            return
        with torch.cuda.stream(self.stream):
            self.ready = (image.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ready is None and not self.exhausted:
            self._load_next()
        if self.ready is None:
            raise StopIteration
        batch = self.ready
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for tensor in batch:
                tensor.record_stream(compute)
            self._load_next()  # start the next copy now; it runs while this batch trains
        else:
            self.ready = None
        return batch
