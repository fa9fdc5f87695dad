"""``scripts/bench_transforms.py --set nnunet``: nnU-Net's initial patch as nnU-Net computes it, our transforms as
``configs/brats-nnunet.yaml`` trains with them, and (with batchgeneratorsv2 installed) a tiny run of the comparison."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import script_module


def test_nnunet_s_initial_patch_and_our_region_for_a_128_patch():
    with script_module("nnunet_pipeline") as pipeline:
        # nnU-Net's get_patch_size for 128^3, rotations up to 30 degrees about each axis, over 0.85: 205^3.
        assert pipeline.nnunet_initial_patch((128, 128, 128)) == (205, 205, 205)
        transforms, region = pipeline.our_transforms((128, 128, 128), all_fire=False)
        assert region == (304, 312, 312)  # never reads outside: 0.7-1.4 and +-30 degrees about every axis
        assert transforms["rotate_scale"].p_rotation == 0.2 and transforms["gamma"].p == 0.3
        fired, _ = pipeline.our_transforms((128, 128, 128), all_fire=True)
        assert fired["rotate_scale"].p_scale == fired["low_resolution"].p == fired["noise"].p == 1.0


def test_a_tiny_comparison_writes_both_timings(tmp_path, monkeypatch):
    pytest.importorskip("batchgeneratorsv2")
    out = tmp_path / "t.json"
    argv = ["--set", "nnunet", "--device", "cpu", "--patch", "32", "--batches", "1", "--iters", "1", "--warmup", "0"]
    monkeypatch.setattr(sys, "argv", ["bench_transforms.py", *argv, "--json", str(out)])
    with script_module("bench_transforms") as bench:
        bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["nnunet", "all-fire"]
    assert all(row["ours_ms_per_batch"] > 0 and row["batchgeneratorsv2_ms_per_batch"] > 0 for row in rows)
