"""The CPU inference path: read from the CPU's flags, checked against fp32 on the first volume, said in one line;
an explicit choice or precision is taken as given."""

import io

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.predict import main as predict_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.loading import AutoCpuPath, load_model, with_cpu_path
from unet_trainer.commands.predict import load_predictor
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.evaluation.cpu_path import (
    BF16_CHANNELS_LAST,
    FP32,
    CpuFeatures,
    cpu_features,
    plan_cpu_path,
    region_agreement,
    settle_cpu_path,
)

AMX = CpuFeatures(frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), "test")
AVX2 = CpuFeatures(frozenset({"avx2", "fma"}), "test")


def test_flags_come_from_cpuinfo_capped_by_onednn_and_from_torch_without_proc(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_features(cpuinfo, {}).native_bf16 == ("amx_bf16", "avx512_bf16")
    assert cpu_features(cpuinfo, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}).native_bf16 == ("avx512_bf16",)
    capped = cpu_features(cpuinfo, {"ONEDNN_MAX_CPU_ISA": "avx512_core"})
    assert capped.native_bf16 == () and "avx512f" in capped.flags and capped.isa_cap == "AVX512_CORE"
    assert "under ONEDNN_MAX_CPU_ISA=AVX512_CORE" in capped.describe()
    assert cpu_features(cpuinfo, {"ONEDNN_MAX_CPU_ISA": "ALL"}).isa_cap is None  # not a level: no cap
    fallback = cpu_features(tmp_path / "absent", {})
    assert fallback.source == "torch.cpu"
    assert ("avx512_bf16" in fallback.flags) == torch.cpu._is_avx512_bf16_supported()


def test_auto_takes_bf16_only_with_native_bf16_flags_and_then_checks_it():
    plan = plan_cpu_path("auto", AMX)
    assert plan.path == BF16_CHANNELS_LAST and plan.needs_check and plan.reason == "CPU has amx_bf16 avx512_bf16"
    plan = plan_cpu_path("auto", AVX2)
    assert plan.path == FP32 and not plan.needs_check
    assert plan.reason == "CPU has no amx_bf16 or avx512_bf16, so bf16 convolutions would be emulated"
    assert plan_cpu_path("fp32", AMX).path == FP32 and not plan_cpu_path("fp32", AMX).needs_check
    forced = plan_cpu_path("bf16", AVX2)
    assert forced.path == BF16_CHANNELS_LAST and not forced.needs_check and "emulated" in forced.reason
    with pytest.raises(ValueError, match="'fp16' is not one of auto, fp32, bf16"):
        plan_cpu_path("fp16", AMX)


def _labels(tumour_radius: float) -> torch.Tensor:
    """A 32^3 map: a ball of oedema (label 2) around a core ball (label 1), enhancing rim (3) near the centre."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    distance = ((grid - 15.5) ** 2).sum(0).sqrt()
    labels = torch.zeros(32, 32, 32, dtype=torch.uint8)
    labels[distance < tumour_radius] = 2
    labels[distance < 9] = 3
    labels[distance < 7] = 1
    return labels


def test_the_fast_path_is_taken_when_it_agrees_and_fp32_when_it_does_not():
    reference = _labels(13.0)
    ran = []

    def check(fast: torch.Tensor):
        return lambda path: ran.append(path) or (reference if path == FP32 else fast)

    choice = settle_cpu_path(plan_cpu_path("auto", AMX), check(reference))
    assert choice.path == BF16_CHANNELS_LAST and ran == [FP32, BF16_CHANNELS_LAST]
    assert choice.message == (
        "CPU path: bf16 autocast + channels-last (CPU has amx_bf16 avx512_bf16; the centred window of the first "
        "volume agrees with fp32: Dice WT 1.000 TC 1.000 ET 1.000, 100.00% of voxels agree)"
    )
    # A fast path whose whole tumour is one voxel shell thinner: WT below the floor.
    choice = settle_cpu_path(plan_cpu_path("auto", AMX), check(_labels(12.0)))
    assert choice.path == FP32
    assert choice.message == (
        "CPU path: fp32 (bf16 autocast + channels-last disagrees with fp32 on the centred window "
        "of the first volume: Dice WT 0.872 TC 1.000 ET 1.000, 93.53% of voxels agree, below 0.995)"
    )
    assert choice.agreement["WT"] < 0.995
    # Without native bf16 nothing is run before choosing.
    ran.clear()
    assert settle_cpu_path(plan_cpu_path("auto", AVX2), check(reference)).path == FP32 and ran == []


def test_regions_too_small_to_judge_are_left_to_the_voxel_share():
    small = _labels(0.0)  # core and enhancing balls of ~1400 and ~1600 voxels, no oedema around them
    small[small == 3] = 0  # no enhancing: TC is the core ball alone
    moved = small.roll(1, 0)
    agreement = region_agreement(small, moved)
    assert agreement["ET"] is None and agreement["TC"] is not None and agreement["TC"] < 0.995
    empty = torch.zeros(32, 32, 32, dtype=torch.uint8)
    assert region_agreement(empty, empty) == {"WT": None, "TC": None, "ET": None, "voxels": 1.0}


# ----------------------------------------------------------------------------------------------
# On a checkpoint trained a few steps, through unet-predict
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cpu-path") / "run"
    cfg = resolve_config(ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, run_dir, "max_duration=2ba"))
    run_training(cfg, progress=False)
    return {"checkpoint": run_dir / "checkpoints" / "latest-rank0.pt", "phantom": raw_data_dir(cfg, progress=False)}


def _predict(trained, out, *extra) -> tuple[int, list[np.ndarray]]:
    status = predict_main([str(trained["checkpoint"]), str(trained["phantom"]), str(out), "--no-progress", *extra])
    return status, [np.asarray(nib.load(path).dataobj) for path in sorted(out.glob("*.nii.gz"))]


def test_unet_predict_on_the_cpu_says_its_path_and_its_labels_agree_with_fp32(trained, tmp_path, capsys):
    status, exact = _predict(trained, tmp_path / "fp32", "device=cpu", "--cpu-path", "fp32")
    assert status == 0 and "CPU path: fp32 (as --cpu-path fp32 asks)" in capsys.readouterr().err
    status, auto = _predict(trained, tmp_path / "auto", "device=cpu")
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("CPU path:")]
    features = cpu_features()
    if not features.native_bf16:
        assert line == f"CPU path: fp32 ({features.describe()})"
    else:
        assert " agrees with fp32: Dice " in line or " disagrees with fp32 on " in line
    # Whichever path the check took, the labels written keep every judged region's Dice with fp32.
    native = {4: 3}  # the phantom is written in BraTS 2021 numbering
    stacked = [
        torch.from_numpy(np.stack([np.vectorize(lambda v: native.get(v, v))(a) for a in m])) for m in (exact, auto)
    ]
    agreement = region_agreement(*stacked)
    assert status == 0 and all(v is None or v >= 0.995 for v in agreement.values()), agreement


def test_precision_on_the_command_line_is_taken_exactly_and_cpu_path_is_refused_where_it_cannot_apply(trained):
    log = io.StringIO()
    loaded = with_cpu_path(
        load_model(trained["checkpoint"], ["device=cpu", "precision=fp32"]), None, ["precision=fp32"], log
    )
    assert (
        not isinstance(loaded, AutoCpuPath)
        and log.getvalue() == "CPU path: fp32 (as the command line's precision asks)\n"
    )
    assert loaded.sliding_window.amp_dtype is None
    with pytest.raises(ConfigError, match="--cpu-path bf16 applies on the CPU only, without precision"):
        with_cpu_path(loaded, "bf16", ["--precision", "fp32"], log)
    with pytest.raises(ConfigError, match="--cpu-path: cpu path 'fast' is not one of auto, fp32, bf16"):
        with_cpu_path(loaded, "fast", [], log)


def test_cpu_path_is_refused_for_an_exported_folder(tmp_path):
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ConfigError, match="--cpu-path fp32 applies to checkpoints"):
        load_predictor([tmp_path], [], io.StringIO(), cpu_path="fp32")


def test_an_injected_disagreeing_fast_path_falls_back_before_the_first_volume(trained, monkeypatch):
    """AutoCpuPath on a real checkpoint: the check runs fp32 then the fast path on the first volume's centred
    window; a fast path made to disagree (every label moved) is dropped and the model runs exactly fp32."""
    import unet_trainer.commands.loading as loading

    real = loading.check_labels

    def disagreeing(predictor, image, path):
        labels = real(predictor, image, path)
        return labels if path == FP32 else (labels + 1) % 4  # every voxel another label

    monkeypatch.setattr(loading, "check_labels", disagreeing)
    log = io.StringIO()
    auto = AutoCpuPath(load_model(trained["checkpoint"], ["device=cpu"]), "auto", log, AMX)
    image = torch.randn(4, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    probs = auto.probabilities(image)
    assert probs.shape == (4, 24, 24, 24) and auto.choice.path == FP32
    assert log.getvalue().startswith("CPU path: fp32 (bf16 autocast + channels-last disagrees")
    assert auto.inner.sliding_window.amp_dtype is None
    assert auto.inner.model.input_memory_format == torch.contiguous_format
    auto.probabilities(image)  # settled once
    assert log.getvalue().count("CPU path:") == 1
