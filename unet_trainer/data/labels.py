"""The short names of the canonical labels (BraTS 2023: 1 necrotic core, 2 oedema, 3 enhancing tumour)
and the evaluation regions made of them, shared by the layouts, the losses, the metrics and the pictures.

A leaf: it imports nothing from the package, so the metrics and losses read the label convention
without loading the dataset layouts.
"""

from __future__ import annotations

#: Short names of the canonical tumour labels, as the scores and pictures call them.
LABEL_NAMES: dict[int, str] = {1: "NCR", 2: "ED", 3: "EN"}  # necrotic core, oedema, enhancing

#: Evaluation regions in canonical labels: whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
#: Order in which region channels/metrics are reported everywhere.
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")
