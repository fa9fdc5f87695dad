"""scripts/gpu_check.py, the one command for a GPU lease, run as a dry run: every step at a tiny size
on the CPU through the same commands and writers, so that a typo cannot break the first GPU run.
Nothing here times anything: the figures of a dry run are not measurements."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from unet_trainer.config.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
STEPS = (
    "cuda_tests",
    "train_resume",
    "model",
    "infer",
    "transforms",
    "train_bench",
    "metrics",
    "nnunet_transforms",
    "ablation",
)


def run_check(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--workers",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    return done, out


def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    # A budget far above the ~1.5 minutes a quiet 2-core machine needs, so a loaded one skips nothing.
    done, out = run_check(tmp_path, "--budget-s", "900")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert [name for name in steps if name != "phantom"] == list(STEPS)
    assert {name: step["status"] for name, step in steps.items()} == {name: "ok" for name in ("phantom", *STEPS)}

    # What comes back from the machine: at most 8 files, none near the 16 MiB limit.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["ablate.json", "gpu_check.json", "gpu_check.log", "gpu_check.md", "phantom.log"]
    assert all((out / name).stat().st_size < 4 * 2**20 for name in files)

    # The CUDA tests were collected and all skipped on the CPU (none selected would be a broken -k).
    counts = steps["cuda_tests"]["counts"]
    assert counts["skipped"] >= 4 and counts["skipped"] == counts["tests"]

    # Stopped by the signal after step 4, resumed from the step it saved, went on to the end.
    train = steps["train_resume"]
    stopped = train["stopped_checkpoint"]["batch"]
    assert train["signalled_after_step"] >= 4 and stopped >= train["signalled_after_step"]
    assert train["resumed_from_step"] == stopped and train["final_checkpoint"]["batch"] == 10
    assert train["resume_continues"] and train["auto_microbatch"] == 4  # the whole batch fits on a CPU
    assert sorted(set(train["steps_logged"])) == list(range(1, 11))

    # Every benchmark's own JSON arrived and its figures reached the table.
    assert {r["model"] for r in steps["model"]["data"]["results"]} == {"ours", "DynUNet"}
    assert steps["infer"]["data"]["ours_ms"] > 0 and steps["infer"]["data"]["monai_ms"] > 0
    assert set(steps["transforms"]["data"]["step_share_percent"]) == {"default", "all-fire"}
    # nnU-Net's set: ours (batchgeneratorsv2 is not in the dev extra, so no peer) and its share of a step.
    nnunet = steps["nnunet_transforms"]["data"]
    assert set(nnunet["step_share_percent"]) == {"nnunet", "all-fire"} and nnunet["regions"]["ours"] == [152, 156, 156]
    assert steps["train_bench"]["data"]["ours"]["median_rate"] > 0 and steps["train_bench"]["data"]["monai"]
    metrics = steps["metrics"]["data"]
    assert metrics["seconds_per_case"]["torch"] > 0 and metrics["largest_difference"] <= 1e-6
    ablation = json.loads((out / "ablate.json").read_text())
    assert list(ablation["ours"]) == ["all switches #0"] and ablation["ours"]["all switches #0"]["median_rate"] > 0

    table = (out / "gpu_check.md").read_text()
    assert "| date | device | step | status |" in table and "torch " in table and "dry run" in table
    for name in STEPS:
        assert f"| {name} | ok |" in table, name
    assert "python scripts/bench_train.py" in table and "unet-train configs/brats.yaml" in table


def test_a_step_that_would_overrun_is_skipped_and_marked(tmp_path):
    done, out = run_check(tmp_path, "--steps", "model", "infer", "--budget-s", "1", timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert list(steps) == ["model", "infer"]
    assert all(step["status"] == "skipped" and "left" in step["reason"] for step in steps.values())
    assert "| model | skipped (" in (out / "gpu_check.md").read_text()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_test_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_gpu_runs_options_parse_in_every_script(tmp_path, monkeypatch):
    """The dry run cannot try the GPU-only values (sizes, --device cuda, compiled modes, the CUDA
    graphs candidate): each script's own parser and the config resolver check them here."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    check = load_script("gpu_check")
    gpu = check.gpu_sizes(16)
    paths = check.Paths(tmp_path, tmp_path, gpu)
    model = load_script("bench_model").parse_args([*gpu.args("model"), "--json", "m.json"])
    assert model.modes == ["eager", "compiled"] and model.batches == [2, 8] and model.device == "cuda"
    infer = load_script("bench_infer").parse_args([*gpu.args("infer"), "--json", "i.json"])
    assert infer.device == "cuda" and infer.size == [155, 240, 240]
    transforms = load_script("bench_transforms").parse_arguments([*gpu.args("transforms"), "--json", "t.json"])
    assert transforms.device == "cuda" and transforms.batches == [2]
    nnunet = load_script("bench_transforms").parse_arguments([*gpu.args("nnunet_transforms"), "--json", "n.json"])
    assert nnunet.set == "nnunet" and nnunet.device == "cuda" and nnunet.batches == [2] and nnunet.patch == 128
    metrics = load_script("bench_metrics").parse_args([*gpu.args("metrics"), "--json", "l.json"])
    assert metrics.device == "cuda" and metrics.shape == (155, 240, 240) and metrics.skip_official
    bench_train = load_script("bench_train")
    train = bench_train.parse_args([*check.bench_train_arguments(gpu, tmp_path, ablation=False), "--json", "b.json"])
    assert (train.shape, train.patch, train.epoch_cases, train.cases) == ([155, 240, 240], 128, 387, 4)
    # Step 9 runs the ablation script, whose parser takes bench_train's options and its own.
    ablation = load_script(check.ABLATION_SCRIPT.removesuffix(".py")).parse_args(
        [
            *check.bench_train_arguments(gpu, tmp_path, ablation=True),
            "--microbatch",
            "16",
            "--resume",
            "--json",
            "a.json",
        ]
    )
    assert (
        ablation.resume
        and ablation.recipe == "fast"
        and ablation.candidate == ["algorithms.compile.mode=reduce-overhead"]
    )
    config, *overrides = check.train_arguments(gpu, paths, tmp_path / "split.json", tmp_path / "run", 16)
    cfg = resolve_config(ROOT / config, overrides)
    assert (cfg["device"], cfg["precision"], cfg["train_batch_size"], cfg["device_train_microbatch_size"]) == (
        "cuda",
        "amp_bf16",
        64,
        "auto",
    )
    assert cfg["data"]["patch_size"] == [128, 128, 128] and cfg["max_duration"] == "20ba"
