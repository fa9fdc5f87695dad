"""The evaluation regions of the canonical label numbering (BraTS 2023: 1 necrotic core, 2 oedema,
3 enhancing tumour), shared by the layouts, the losses and the metrics.

A leaf: it imports nothing from the package, so the metrics and losses read the label convention
without loading the dataset layouts.
"""

from __future__ import annotations

#: Evaluation regions in canonical labels: whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
#: Order in which region channels/metrics are reported everywhere.
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")
