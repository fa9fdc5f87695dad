"""The plumbing of the CPU row of scripts/bench_infer.py at a tiny size: the full-grid phantom volume it infers,
the path it times ours in (the one unet-predict takes), the label comparison and the peak-memory reading.
The full-size timings live in the benchmark, never in tests."""

import pytest
import torch
from conftest import script_module

from unet_trainer.evaluation.cpu_path import BF16_CHANNELS_LAST, FP32, cpu_features


@pytest.fixture(scope="module")
def bench():
    with script_module("bench_infer_cpu") as module:  # it imports benchutil
        yield module


def test_the_volume_is_the_prepared_case_on_the_full_grid(bench):
    image, truth = bench.phantom_volume(0, (40, 48, 44))
    assert image.shape == (4, 40, 48, 44) and truth.shape == (40, 48, 44) and truth.dtype == torch.uint8
    head = image[0] != 0
    assert truth[~head].eq(0).all() and truth.gt(0).any()
    for channel in image:  # z-scored over the head's voxels
        values = channel[head]
        assert abs(float(values.mean())) < 1e-3 and abs(float(values.std()) - 1) < 1e-2


def test_ours_runs_in_the_path_unet_predict_takes_and_is_compared_with_monai(bench):
    torch.manual_seed(0)
    model = bench.UNet(**bench.brats_3d_model(32)).eval()
    image, _ = bench.phantom_volume(0, (64, 64, 64))
    with torch.no_grad():
        monai_labels = bench.monai_fp32(model, image, 64).argmax(0).to(torch.uint8)
        row = bench._ours_row(model, image, monai_labels, 64, 0, 1)
    expected = (FP32.name, BF16_CHANNELS_LAST.name) if cpu_features().native_bf16 else (FP32.name,)
    assert row["path"] in expected and row["path_line"].startswith(f"CPU path: {row['path']} (")
    assert row["seconds"] > 0 and row["check_s"] >= 0 and row["peak_gib"] > 0
    if row["path"] == FP32.name:  # one window, the same placement: fp32 labels agree to float rounding
        assert row["voxels_agree"] > 0.999


def test_peak_memory_is_the_blocks_own_where_linux_lets_it_be_reset(bench):
    with bench.peak_rss() as before:
        pass
    with bench.peak_rss() as during:
        block = torch.ones(64, 2**20)  # 256 MiB, written
        del block
    assert during.method == before.method
    if during.method.startswith("VmHWM"):
        assert during.gib - before.gib > 0.2
