#!/usr/bin/env python
"""Every CUDA code path run and every GPU speed target measured, in one command of at most 6 minutes.

Made for a short turn on a GPU machine (one H200, 16 cores, no internet; see docs/gpu-check.md for the
wheels to bring and the exact command). Steps, in order of value, each a subprocess of an
existing command with its own time limit:

    1 cuda_tests    ``python -m pytest -k cuda tests`` (the CUDA-only tests; on a CPU they skip)
    2 train_resume  ``unet-train configs/brats.yaml`` on a full-size phantom (4 cases of 155x240x240,
                    128^3 patches, bf16, global batch 64, device_train_microbatch_size auto) for 20
                    steps: stopped by SIGTERM once step 10 is logged, then the same command again,
                    which resumes from the saved step; reports where the auto microbatch settled
    3 model         scripts/bench_model.py: ours against DynUNet, eager and compiled, batch 2 and 8
    4 infer         scripts/bench_infer.py: ours against monai.inferers.sliding_window_inference
    5 transforms    scripts/bench_transforms.py: the augmentation's share of a training step
    6 train_bench   scripts/bench_train.py: ours against the MONAI-built pipeline end to end
    7 metrics       scripts/bench_metrics.py: lesion-wise metrics, torch on the GPU against SciPy
    8 nnunet_transforms
                    scripts/bench_transforms.py --set nnunet: nnU-Net's augmentation set (rotation and
                    scaling resampled on the device) as a share of a training step
    9 ablation      scripts/bench_ablation.py --recipe fast with whatever time is left

The phantom (generation and preparation, timed) is made in the background while step 1 runs.
A step starts only when the time left under ``--budget-s`` is at least its minimum; it is given
its own budget or the time left, whichever is smaller, and is killed at that limit (its partial
JSON, written by the benchmarks after every measurement, is kept). Skipped steps are marked.

Into ``--out`` (default ``$OUT`` when set, else ./gpu-check-out), rewritten after every step so a
command stopped at its limit returns everything measured so far:

    gpu_check.json   every figure, the raw benchmark JSONs, versions, commands, statuses
    gpu_check.md     one Markdown table ready to paste into BENCHMARKS.md
    gpu_check.log    the output of every command run
    phantom.log      the phantom generation and preparation
    ablate.json      bench_ablation's file (``--resume-ablation`` continues it in a later command)

``--dry-run`` runs every step at a tiny size on the CPU (the same commands with smaller options,
the same writers) in about 120 CPU-seconds (11 Python processes, each paying its imports);
tests/test_gpu_check.py runs it, so a typo cannot break the first GPU run. Its step 1 really runs
``pytest -k cuda``, where every test skips. ``cpu_s`` per step in the JSON is what a loaded machine
cannot hide: the CPU seconds of the step's processes.

Examples:
    python scripts/gpu_check.py                         # on the GPU machine, everything, 6 minutes
    python scripts/gpu_check.py --steps ablation --resume-ablation .bench/ablate.json   # a rerun
    python scripts/gpu_check.py --dry-run --out /tmp/gc  # CPU, tiny, about 1.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STEP_NAMES = (
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
# Step 8's script: bench_train.py's options plus its own (--candidate, --repeats, --resume).
ABLATION_SCRIPT = "bench_ablation.py"
# The speed targets on one H200 (BENCHMARKS.md), checked in the table; each benchmark prints its own too.
TARGETS = {
    "model_speed": (">=", 1.5, "ours / DynUNet eager samples/s at batch 2"),
    "model_memory": ("<=", 1.0, "ours / DynUNet eager peak memory at batch 2"),
    "infer_ratio": ("<=", 0.7, "ours / MONAI sliding-window time"),
    "augment_share": ("<", 5.0, "augmentation, % of one training step (batch 2)"),
    "train_ratio": (">=", 2.0, "ours / MONAI end-to-end samples/s"),
    "train_wait": ("<", 5.0, "ours data wait, % of step time"),
    "train_rate": (">=", 60.0, "ours end-to-end samples/s (first milestone)"),
}


# --------------------------------------------------------------------------------------------
# Sizes: the GPU run and the tiny CPU dry run differ only in these values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step's size: its own command-line arguments, as typed on a shell, and its time."""

    args: str  # split with shlex; the step adds the paths of this run's phantom and work folder
    budget: float  # seconds it may run at most
    minimum: float  # seconds that must be left for it to start


@dataclass(frozen=True)
class Sizes:
    device: str
    phantom_cases: int
    phantom_shape: tuple[int, int, int]
    epoch_cases: int  # training entries per epoch (the 3 training volumes repeated)
    train_steps: int
    stop_at: int  # the step after which train_resume sends SIGTERM
    steps: dict[str, Step]  # one per STEP_NAMES entry, in their order

    def args(self, step: str) -> tuple[str, ...]:
        """The step's own arguments, split as a shell would."""
        return tuple(shlex.split(self.steps[step].args))


def gpu_sizes(workers: int) -> Sizes:
    """The full setting on one GPU. The budgets add up to more than 6 minutes on purpose: a step
    that finishes early leaves its time to the next, and the ablation takes what is left."""
    epochs = f"--warmup-epochs 1 --timed-epochs 1 --eval-repeats {{}} --prepare-workers {workers}"
    return Sizes(
        device="cuda",
        phantom_cases=4,
        phantom_shape=(155, 240, 240),
        epoch_cases=387,
        train_steps=20,
        stop_at=10,
        steps={
            "cuda_tests": Step("", 60, 20),  # its pytest command is fixed (step_cuda_tests)
            # configs/brats.yaml as shipped: bf16, batch 64, auto microbatch
            "train_resume": Step("device=cuda", 110, 60),
            "model": Step(
                "--device cuda --batches 2 8 --modes eager compiled --models ours DynUNet --iters 10 --warmup 3", 80, 30
            ),
            "infer": Step("--device cuda --iters 5 --warmup 2", 40, 15),
            "transforms": Step("--device cuda --batches 2 --iters 10 --warmup 2", 40, 15),
            "train_bench": Step(f"--device cuda {epochs.format(2)}", 120, 60),
            # The official package is not on the GPU machine: its CPU figure is in BENCHMARKS.md.
            "metrics": Step("--device cuda --cases 2 --skip-official", 60, 30),
            "nnunet_transforms": Step("--set nnunet --device cuda --batches 2 --iters 5 --warmup 2", 50, 20),
            "ablation": Step(
                f"--device cuda {epochs.format(1)} --candidate algorithms.compile.mode=reduce-overhead", 600, 60
            ),
        },
    )


def dry_sizes(workers: int) -> Sizes:
    """Tiny CPU sizes that run the same commands in about 120 CPU-seconds. Generous limits: on a
    loaded 2-core machine each step takes several times its quiet time."""
    tiny_model = "model.unet.filters=[4,8,16] model.unet.kernel_sizes=[3,3,3] model.unet.strides=[1,2,2]"
    tiny_train = "--device cpu --epoch-cases 8 --patch 16 --depth 3 --width-divisor 8 --batch 4"
    epochs = f"--warmup-epochs 0 --timed-epochs 1 --eval-repeats 1 --prepare-workers {workers}"
    # Every switch is turned off, so the ablation machinery runs its one quick reference run
    # (compiling on a CPU takes half a minute a run), without the evaluation step 6 timed.
    switches_off = (
        "--override algorithms.compile=null --override algorithms.channels_last=null "
        "--override algorithms.cudnn_benchmark=null --override data.prefetch_to_device=false"
    )
    return Sizes(
        device="cpu",
        phantom_cases=4,
        phantom_shape=(24, 32, 32),
        epoch_cases=8,
        train_steps=10,
        stop_at=4,
        steps={
            "cuda_tests": Step("", 120, 5),
            "train_resume": Step(
                "device=cpu precision=fp32 train_batch_size=4 data.patch_size=[16,16,16] data.num_workers=1 "
                + tiny_model,
                180,
                5,
            ),
            "model": Step(
                "--device cpu --patch 64 --width-divisor 32 --batches 1 --modes eager --models ours DynUNet "
                "--iters 1 --warmup 0",
                120,
                5,
            ),
            "infer": Step("--device cpu --size 48 64 64 --window 64 --width-divisor 32 --iters 1 --warmup 0", 120, 5),
            "transforms": Step(
                "--device cpu --patch 64 --batches 2 --iters 1 --warmup 0 --share --width-divisor 32", 120, 5
            ),
            "train_bench": Step(f"{tiny_train} --microbatch auto --workers 1 {epochs}", 180, 5),
            "metrics": Step("--device cpu --cases 1 --shape 24 32 32 --skip-official", 60, 5),
            "nnunet_transforms": Step(
                "--set nnunet --device cpu --patch 64 --batches 2 --iters 1 --warmup 0 --share --width-divisor 32",
                120,
                5,
            ),
            "ablation": Step(f"{tiny_train} --workers 1 --skip-eval {epochs} {switches_off}", 240, 5),
        },
    )


# --------------------------------------------------------------------------------------------
# The report: one JSON and one Markdown table, rewritten after every step
# --------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def target_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, bound, _ = TARGETS[key]
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


def figure(
    what: str,
    ours: float | None = None,
    peer: float | None = None,
    unit: str = "",
    ratio: float | None = None,
    target: str | None = None,
    value: float | None = None,
) -> dict:
    """One row of the table. ``target`` names a TARGETS entry checked against ``value`` (the ratio
    when not given)."""
    if ratio is None and ours is not None and peer:
        ratio = ours / peer
    checked = value if value is not None else ratio
    row = {"what": what, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio}
    if target is not None:
        op, bound, _ = TARGETS[target]
        row.update(target=f"{op} {bound:g}", met=target_met(target, checked))
    return row


class Report:
    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "steps": {}}

    def record(self, name: str, result: dict) -> None:
        self.data["steps"][name] = result
        self.write()

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.data["meta"]["_started"], 1)
        shown = {**self.data, "meta": {k: v for k, v in self.data["meta"].items() if not k.startswith("_")}}
        atomic_write(self.out / "gpu_check.json", json.dumps(shown, indent=1, default=str))
        atomic_write(self.out / "gpu_check.md", markdown(shown))


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    """The table for BENCHMARKS.md: the run's date, device, versions and command, then one row per figure."""
    meta = report["meta"]
    lines = [
        f"GPU check of {meta['date']}: {meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, "
        f"cuDNN {meta['cudnn']}, MONAI {meta['monai']}, Python {meta['python']}; {meta['cpus']} CPU cores; "
        f"commit {meta.get('commit') or 'unknown'}",
        "",
        f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget"
        f"{'; dry run: tiny sizes on the CPU, not a measurement' if meta['dry_run'] else ''})",
        "",
        "| date | device | step | status | wall s | measurement | ours | peer | unit | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    first = True
    for name, step in report["steps"].items():
        status = step["status"] + (f" ({step['reason']})" if step.get("reason") else "")
        rows = step.get("figures") or [{"what": ""}]
        for index, row in enumerate(rows):
            met = row.get("met")
            lines.append(
                "| "
                + " | ".join(
                    [
                        meta["date"] if first else "",
                        meta["device_short"] if first else "",
                        name if index == 0 else "",
                        status if index == 0 else "",
                        _fmt(step.get("wall_s"), 0) if index == 0 else "",
                        row.get("what", ""),
                        _fmt(row.get("ours")),
                        _fmt(row.get("peer")),
                        row.get("unit", ""),
                        _fmt(row.get("ratio"), 3),
                        row.get("target", ""),
                        "" if met is None else ("yes" if met else "**no**"),
                    ]
                )
                + " |"
            )
            first = False
    lines.append("")
    for name, step in report["steps"].items():
        if step.get("command"):
            lines.append(f"- {name}: `{step['command']}`")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Running commands under a time limit
# --------------------------------------------------------------------------------------------


def cli_command(module: str, *args: str) -> tuple[list[str], str]:
    """A console script of ours (its module in unet_trainer/cli/, e.g. "train" for unet-train) run
    through this interpreter (no PATH needed), and how it reads."""
    code = f"import sys; from unet_trainer.cli.{module} import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args], shlex.join([f"unet-{module}", *args])


def script_command(script: str, *args: str) -> tuple[list[str], str]:
    return [sys.executable, str(SCRIPTS / script), *args], shlex.join(["python", f"scripts/{script}", *args])


def child_environment() -> dict:
    """The repository first on PYTHONPATH (the package and scripts import without an install),
    unbuffered output, and no progress bars' carriage returns bloating the log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(SCRIPTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", "5")
    return env


# Each command in its own process group, so that its limit kills its workers too; not in a new
# session: a machine that ends a command's leftover processes when it returns (as a batch or
# container runner may) spares those that started a session of their own, which would run on.
OWN_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


class Runner:
    """Runs commands with their output appended to one log; kills a command's whole process group
    at its limit (DataLoader workers and benchmark children included)."""

    def __init__(self, log: Path):
        self.log = log
        self.current: subprocess.Popen | None = None

    def start(self, command: list[str], shown: str, log: Path | None = None) -> tuple[subprocess.Popen, int]:
        path = log or self.log
        with open(path, "a") as handle:
            handle.write(f"\n$ {shown}\n")
            offset = handle.tell()
        handle = open(path, "a")
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=child_environment(), **OWN_PROCESS_GROUP
        )
        handle.close()  # the child holds its own copy
        return process, offset

    def run(
        self, command: list[str], shown: str, timeout: float, log: Path | None = None
    ) -> tuple[int | None, str, float]:
        """Returns (exit code, None when killed at the limit; the command's output; seconds)."""
        started = time.monotonic()
        process, offset = self.start(command, shown, log)
        self.current = process
        code = wait_or_kill(process, timeout)
        self.current = None
        with open(log or self.log) as handle:
            handle.seek(offset)
            output = handle.read()
        return code, output, time.monotonic() - started


def kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_or_kill(process: subprocess.Popen, timeout: float) -> int | None:
    try:
        return process.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        kill_group(process)
        return None


def trim_log(path: Path, limit: int = 12 * 2**20, head: int = 2 * 2**20, tail: int = 8 * 2**20) -> None:
    """Keep a log under what the machine sends back (16 MiB a file): its start and its end."""
    if not path.is_file() or path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    cut = len(data) - head - tail
    atomic_write(
        path, (data[:head] + f"\n[... {cut} bytes cut ...]\n".encode() + data[-tail:]).decode(errors="replace")
    )


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The phantom, made in the background
# --------------------------------------------------------------------------------------------


@dataclass
class Paths:
    work: Path
    out: Path
    sizes: Sizes

    @property
    def phantom(self) -> Path:
        # The name bench_train.py's ensure_phantom looks for, so the benchmarks reuse it.
        shape = "x".join(map(str, self.sizes.phantom_shape))
        return self.work / f"phantom-{self.sizes.phantom_cases}cases-{shape}-seed0"

    @property
    def prepared(self) -> Path:
        return self.work / f"prepared-{self.phantom.name}"  # bench_train.py's data.prepared_path


@dataclass
class PhantomJob:
    """Generation then preparation in a thread, so step 1 runs meanwhile."""

    paths: Paths
    workers: int
    runner: Runner
    result: dict = field(default_factory=dict)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._make, daemon=True)
        self.thread.start()

    def _make(self) -> None:
        sizes, log = self.paths.sizes, self.paths.out / "phantom.log"
        synth, synth_shown = cli_command(
            "data",
            "synth",
            "--out",
            str(self.paths.phantom),
            "--cases",
            str(sizes.phantom_cases),
            "--shape",
            *map(str, sizes.phantom_shape),
            "--workers",
            str(self.workers),
        )
        prepare, prepare_shown = cli_command(
            "data",
            "prepare",
            str(self.paths.phantom),
            "--out",
            str(self.paths.prepared),
            "--workers",
            str(self.workers),
        )
        self.result = {
            "status": "running",
            "cases": sizes.phantom_cases,
            "shape": list(sizes.phantom_shape),
            "workers": self.workers,
            "command": f"{synth_shown} && {prepare_shown}",
        }
        reused = (self.paths.phantom / "phantom.json").is_file()
        code, _, synth_s = self.runner.run(synth, synth_shown, 300, log)
        self.result.update(synth_s=round(synth_s, 2), synth_reused=reused)
        if code != 0:
            self.result.update(status="failed", reason=f"unet-data synth exit {code}")
            return
        code, _, prepare_s = self.runner.run(prepare, prepare_shown, 300, log)
        self.result.update(prepare_s=round(prepare_s, 2), total_s=round(synth_s + prepare_s, 2))
        self.result["status"] = "ok" if code == 0 else "failed"
        if code != 0:
            self.result["reason"] = f"unet-data prepare exit {code}"
        else:
            self.result["figures"] = [
                figure("phantom generation + preparation", synth_s + prepare_s, unit="s", ratio=None)
            ]

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return self.result.get("status") == "ok"


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    paths: Paths
    runner: Runner
    phantom: PhantomJob
    deadline: float
    settled_microbatch: int | None = None  # where "auto" settled in train_resume or train_bench


def junit_counts(path: Path) -> dict[str, int]:
    """Tests run, failed, errored and skipped, from pytest's JUnit XML (empty when it is unreadable)."""
    import xml.etree.ElementTree as ElementTree

    try:
        suite = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def step_cuda_tests(ctx: Context, timeout: float) -> dict:
    junit = ctx.paths.work / "cuda_tests.xml"
    junit.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-k",
        "cuda",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "tests",
    ]
    shown = "python -m pytest -q -k cuda tests"
    code, output, wall = ctx.runner.run(command, shown, timeout)
    counts = junit_counts(junit)
    status = "timeout" if code is None else ("ok" if code == 0 else "failed")
    figures = [figure("CUDA tests passed / failed / skipped", unit="tests", ratio=None)] if counts else []
    if counts:
        figures[0]["ours"] = f"{counts['passed']} / {counts['failures'] + counts['errors']} / {counts['skipped']}"
    return {"status": status, "exit": code, "wall_s": wall, "command": shown, "counts": counts, "figures": figures}


def write_train_split(paths: Paths) -> Path:
    """The first cases - 1 phantom ids repeated to the epoch's entries (an epoch of 387 entries has the
    recipe's 7 steps at batch 64), the last id for validation."""
    ids = [f"BraTS2021_{i:05d}" for i in range(paths.sizes.phantom_cases)]
    pool = ids[:-1]
    split = {"train": [pool[i % len(pool)] for i in range(paths.sizes.epoch_cases)], "val": ids[-1:]}
    path = paths.work / "train-split.json"
    path.write_text(json.dumps(split))
    return path


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def checkpoint_summary(run_dir: Path) -> dict:
    """The newest epoch/batch checkpoint's step and settled auto microbatch (read weights-only)."""
    import torch

    pattern = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt$")
    found = sorted(
        ((int(m.group(2)), p) for p in (run_dir / "checkpoints").glob("*.pt") if (m := pattern.search(p.name))),
        key=lambda item: item[0],
    )
    if not found:
        return {}
    batch, path = found[-1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "checkpoint": path.name,
        "batch": state["timestamp"]["batch"],
        "file_batch": batch,
        "auto_microbatch": state.get("extra_state", {}).get("auto_microbatch"),
    }


def step_train_resume(ctx: Context, timeout: float) -> dict:
    sizes, paths = ctx.sizes, ctx.paths
    run_dir = paths.work / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    split = write_train_split(paths)
    command, shown = cli_command("train", *train_arguments(sizes, paths, split, run_dir, ctx.args.workers))
    ends = time.monotonic() + timeout
    result: dict = {"status": "failed", "command": shown, "run_dir": str(run_dir)}

    # Run 1: stopped by SIGTERM (to the trainer only: its workers must not die first) once the step
    # logged reaches stop_at; the signal handler stops at the next batch boundary and saves.
    started = time.monotonic()
    process, offset = ctx.runner.start(command, shown)
    ctx.runner.current = process
    signalled_after = None
    while process.poll() is None and time.monotonic() < ends:
        steps = [r["batch"] for r in train_records(run_dir) if r.get("kind") == "train"]
        if steps and max(steps) >= sizes.stop_at and signalled_after is None:
            signalled_after = max(steps)
            process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
    code = wait_or_kill(process, ends - time.monotonic())
    ctx.runner.current = None
    first = checkpoint_summary(run_dir)
    result.update(
        first_exit=code,
        signalled_after_step=signalled_after,
        stopped_checkpoint=first,
        first_wall_s=round(time.monotonic() - started, 1),
    )
    if code is None:
        result.update(status="timeout", reason="the first run did not finish in time")
        return result
    if code != 0 or signalled_after is None:
        result["reason"] = (
            f"first run exit {code}"
            if code != 0
            else f"the run finished before step {sizes.stop_at} was seen; nothing to resume"
        )
        return result

    # Run 2: the same command resumes from the saved step and trains to the end.
    code, output, second_wall = ctx.runner.run(command, shown + "   # again: resumes", ends - time.monotonic())
    resumed = re.search(r"Resuming from (\S+) \(epoch (\d+), batch (\d+)\)", output)
    last = checkpoint_summary(run_dir)
    records = [r for r in train_records(run_dir) if r.get("kind") == "train"]
    later = [r for r in records if r["batch"] > first.get("batch", 0)]
    rates = [r["throughput/samples_per_sec"] for r in later[2:] if "throughput/samples_per_sec" in r]
    waits = [r["throughput/data_wait_fraction"] for r in later[2:] if "throughput/data_wait_fraction" in r]
    peaks = [r.get("memory/peak_allocated_gib") for r in records if r.get("memory/peak_allocated_gib")]
    evals = [r for r in train_records(run_dir) if r.get("kind") == "eval"]
    resumed_at = int(resumed.group(3)) if resumed else None
    continues = (
        resumed_at is not None
        and resumed_at == first.get("batch")
        and bool(later)
        and later[0]["batch"] == resumed_at + 1
        and last.get("batch") == sizes.train_steps
    )
    result.update(
        second_exit=code,
        second_wall_s=round(second_wall, 1),
        resumed_from_step=resumed_at,
        final_checkpoint=last,
        steps_logged=[r["batch"] for r in records],
        auto_microbatch=last.get("auto_microbatch", first.get("auto_microbatch")),
        samples_per_s_median=statistics.median(rates) if rates else None,
        data_wait_fraction_median=statistics.median(waits) if waits else None,
        peak_allocated_gib=max(peaks) if peaks else None,
        final_eval={k: v for k, v in evals[-1].items() if k.startswith("dice/")} if evals else None,
        resume_continues=continues,
    )
    if isinstance(result["auto_microbatch"], int):
        ctx.settled_microbatch = result["auto_microbatch"]
    result["figures"] = [
        figure("stopped by SIGTERM at step (its checkpoint)", first.get("batch"), unit="step"),
        figure("resumed from step", resumed_at, unit="step"),
        figure("final step", last.get("batch"), unit="step"),
        figure("auto microbatch settled at", result["auto_microbatch"], unit="samples"),
        figure("samples/s after the resume (median of steps)", result["samples_per_s_median"], unit="samples/s"),
        figure(
            "data wait after the resume (median)",
            100 * result["data_wait_fraction_median"] if result["data_wait_fraction_median"] is not None else None,
            unit="%",
        ),
        figure("peak allocated memory", result["peak_allocated_gib"], unit="GiB"),
    ]
    if code is None:
        result.update(status="timeout", reason="the resumed run did not finish in time")
    elif code != 0:
        result["reason"] = f"resumed run exit {code}"
    elif not continues:
        result["reason"] = "the resumed run did not continue from the saved step to the end"
    else:
        result["status"] = "ok"
    return result


def run_bench(
    ctx: Context, timeout: float, script: str, args: tuple[str, ...], json_name: str
) -> tuple[dict, dict | None]:
    json_path = ctx.paths.work / json_name
    json_path.unlink(missing_ok=True)
    command, shown = script_command(script, *args, "--json", str(json_path))
    code, _, wall = ctx.runner.run(command, shown, timeout)
    status = "timeout" if code is None else ("ok" if code == 0 else "failed")
    data = read_json(json_path)
    result = {"status": status, "exit": code, "wall_s": wall, "command": shown, "data": data}
    if status == "timeout" and data:
        result["reason"] = "killed at its limit; partial results"
    return result, data


def step_model(ctx: Context, timeout: float) -> dict:
    result, data = run_bench(ctx, timeout, "bench_model.py", ctx.sizes.args("model"), "model.json")
    rows = {(r["model"], r["mode"], r["batch"]): r for r in (data or {}).get("results", [])}
    figures = []
    for (model, mode, batch), r in sorted(rows.items(), key=lambda item: (item[0][1], item[0][2])):
        if model != "ours":
            continue
        peer = rows.get(("DynUNet", mode, batch), {})
        reference = mode == "eager" and batch == 2
        figures.append(
            figure(
                f"fwd+bwd {mode}, batch {batch}",
                r.get("samples_per_s"),
                peer.get("samples_per_s"),
                "samples/s",
                target="model_speed" if reference else None,
            )
        )
        mine, theirs = r.get("peak_bytes"), peer.get("peak_bytes")
        figures.append(
            figure(
                f"peak memory {mode}, batch {batch}",
                mine / 2**20 if mine is not None else None,
                theirs / 2**20 if theirs else None,
                "MiB",
                target="model_memory" if reference else None,
            )
        )
    result["figures"] = figures
    return result


def step_infer(ctx: Context, timeout: float) -> dict:
    result, data = run_bench(ctx, timeout, "bench_infer.py", ctx.sizes.args("infer"), "infer.json")
    data = data or {}
    result["figures"] = [
        figure("sliding window per volume", data.get("ours_ms"), data.get("monai_ms"), "ms", target="infer_ratio")
    ]
    if data.get("ours_peak_gib") is not None:
        result["figures"].append(
            figure("sliding window peak memory", data.get("ours_peak_gib"), data.get("monai_peak_gib"), "GiB")
        )
    return result


def step_transforms(ctx: Context, timeout: float) -> dict:
    result, data = run_bench(ctx, timeout, "bench_transforms.py", ctx.sizes.args("transforms"), "transforms.json")
    data = data or {}
    figures = [
        figure(
            f"augment {r['setting']} on {r['device']}, batch {r['batch']}",
            r["ours_patches_per_s"],
            r["monai_patches_per_s"],
            "patches/s",
        )
        for r in data.get("rows", [])
    ]
    result["figures"] = figures + share_figures(data, "augmentation")
    return result


def share_figures(data: dict, what: str) -> list[dict]:
    """The augmentation's share of a training step per setting, from bench_transforms' JSON."""
    return [
        figure(f"{what} share of a step ({setting}, batch 2)", share, unit="%", target="augment_share", value=share)
        for setting, share in data.get("step_share_percent", {}).items()
    ]


def step_nnunet_transforms(ctx: Context, timeout: float) -> dict:
    result, data = run_bench(
        ctx, timeout, "bench_transforms.py", ctx.sizes.args("nnunet_transforms"), "nnunet_transforms.json"
    )
    data = data or {}
    figures = [
        figure(
            f"nnU-Net augmentation {r['setting']} on {r['device']}, batch {r['batch']}",
            r["ours_ms_per_batch"],
            r.get("batchgeneratorsv2_ms_per_batch"),
            "ms/batch",
        )
        for r in data.get("rows", [])
    ]
    result["figures"] = figures + share_figures(data, "nnU-Net augmentation")
    return result


def bench_train_arguments(sizes: Sizes, work: Path, ablation: bool) -> tuple[str, ...]:
    """bench_train.py's options for step 6 (``ablation=False``), or ABLATION_SCRIPT's for step 9, on the
    phantom made here."""
    args = sizes.args("ablation") + ("--recipe", "fast", "--only", "ours") if ablation else sizes.args("train_bench")
    args += ("--work", str(work), "--cases", str(sizes.phantom_cases), "--shape", *map(str, sizes.phantom_shape))
    if "--epoch-cases" not in args:
        args += ("--epoch-cases", str(sizes.epoch_cases))
    return args


def train_arguments(sizes: Sizes, paths: Paths, split: Path, run_dir: Path, workers: int) -> tuple[str, ...]:
    """unet-train's config and overrides for step 2."""
    return (
        "configs/brats.yaml",
        f"data.path={paths.phantom}",
        f"data.prepared_path={paths.prepared}",
        f"data.split_file={split}",
        f"save_folder={run_dir}",
        f"max_duration={sizes.train_steps}ba",
        f"data.prepare_workers={workers}",
        *sizes.args("train_resume"),
    )


def step_train_bench(ctx: Context, timeout: float) -> dict:
    args = bench_train_arguments(ctx.sizes, ctx.paths.work, ablation=False)
    result, data = run_bench(ctx, timeout, "bench_train.py", args, "train.json")
    ours, monai = (data or {}).get("ours") or {}, (data or {}).get("monai") or {}
    # The median over steps, as bench_train.py checks its targets; whole epochs (loader restarts
    # and the short last batch included) beside it.
    rate, peer = ours.get("median_rate"), monai.get("median_rate")
    wait = ours.get("wait_fraction")
    result["figures"] = [
        figure("end to end, median step", rate, peer, "samples/s", target="train_ratio"),
        figure("end to end (first milestone)", rate, unit="samples/s", ratio=None, target="train_rate", value=rate),
        figure("end to end, whole epochs", ours.get("epoch_rate"), monai.get("epoch_rate"), "samples/s"),
        figure(
            "data wait",
            100 * wait if wait is not None else None,
            100 * monai["wait_fraction"] if monai.get("wait_fraction") is not None else None,
            "%",
            ratio=None,
            target="train_wait",
            value=100 * wait if wait is not None else None,
        ),
        figure("evaluation of a brain-box case", ours.get("eval_crop_s"), monai.get("eval_crop_s"), "s"),
        figure(
            "peak memory",
            ours["peak_bytes"] / 2**30 if ours.get("peak_bytes") else None,
            monai["peak_bytes"] / 2**30 if monai.get("peak_bytes") else None,
            "GiB",
        ),
        figure("auto microbatch", ours.get("microbatch"), unit="samples", ratio=None),
    ]
    if isinstance(ours.get("microbatch"), int):
        ctx.settled_microbatch = ours["microbatch"]
    return result


def ablation_figures(data: dict | None) -> list[dict]:
    """Each variant's median samples/s against the all-switches reference, from bench_ablation's JSON."""
    if not data or not isinstance(data.get("ours"), dict):
        return []
    rates: dict[str, list[float]] = {}
    for label, measurement in data["ours"].items():
        if measurement:
            rates.setdefault(label.rsplit(" #", 1)[0], []).append(measurement["median_rate"])
    reference = statistics.median(rates["all switches"]) if rates.get("all switches") else None
    figures = []
    for variant in data.get("variants", []):
        measured = rates.get(variant["label"])
        rate = statistics.median(measured) if measured else None
        figures.append(figure(f"fast recipe: {variant['label']}", rate, reference, "samples/s"))
    return figures


def step_metrics(ctx: Context, timeout: float) -> dict:
    result, data = run_bench(ctx, timeout, "bench_metrics.py", ctx.sizes.args("metrics"), "metrics.json")
    seconds = (data or {}).get("seconds_per_case", {})
    result["figures"] = [
        figure("lesion-wise metrics per BraTS case, torch vs SciPy", seconds.get("torch"), seconds.get("scipy"), "s")
    ]
    if data and data.get("largest_difference") is not None:
        result["figures"].append(
            figure("largest torch - SciPy score difference (<= 1e-6)", data["largest_difference"], ratio=None)
        )
    return result


def step_ablation(ctx: Context, timeout: float) -> dict:
    target = ctx.paths.out / "ablate.json"
    args = bench_train_arguments(ctx.sizes, ctx.paths.work, ablation=True)
    # A fixed microbatch: every variant searching "auto" again would pay the out-of-memory attempts,
    # and with compile a compilation for each size tried. The size "auto" settled on in this
    # command, or --ablation-microbatch (which a resumed ablation must repeat: it is its setting).
    microbatch = ctx.args.ablation_microbatch or ctx.settled_microbatch
    if microbatch is not None:
        args += ("--microbatch", str(microbatch))
    if ctx.args.resume_ablation:
        if Path(ctx.args.resume_ablation).resolve() != target.resolve():
            shutil.copyfile(ctx.args.resume_ablation, target)
        args += ("--resume",)
    command, shown = script_command(ABLATION_SCRIPT, *args, "--json", str(target))
    code, _, wall = ctx.runner.run(command, shown, timeout)
    data = read_json(target)
    status = "timeout" if code is None else ("ok" if code == 0 else "failed")
    result = {
        "status": status,
        "exit": code,
        "wall_s": wall,
        "command": shown,
        "data": data,
        "figures": ablation_figures(data),
    }
    if status == "timeout":
        result["reason"] = (
            "killed at its limit; rerun with --steps ablation --resume-ablation "
            "<the returned ablate.json> to measure the rest"
        )
    return result


STEPS: dict[str, Callable[[Context, float], dict]] = {
    "cuda_tests": step_cuda_tests,
    "train_resume": step_train_resume,
    "model": step_model,
    "infer": step_infer,
    "transforms": step_transforms,
    "nnunet_transforms": step_nnunet_transforms,
    "train_bench": step_train_bench,
    "metrics": step_metrics,
    "ablation": step_ablation,
}
NEEDS_PHANTOM = {"train_resume", "train_bench", "ablation"}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def versions(device: str) -> dict:
    import torch

    meta = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:  # read from its metadata: importing MONAI would cost seconds for one string
        meta["monai"] = importlib.metadata.version("monai")
    except importlib.metadata.PackageNotFoundError:
        meta["monai"] = "not installed"
    if device == "cuda":
        # From nvidia-smi, not torch: a CUDA context here would hold GPU memory through every step.
        try:
            line = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
            name, memory_mib, driver = (part.strip() for part in line.split(","))
            meta["device_short"] = name
            meta["device"] = f"{name} ({float(memory_mib) / 1024:.0f} GiB), driver {driver}"
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            meta["device_short"] = meta["device"] = "CUDA GPU (nvidia-smi unreadable)"
    else:
        sys.path.insert(0, str(SCRIPTS))
        from benchutil import cpu_model_name

        meta["device_short"] = f"{cpu_model_name()}, {os.cpu_count()} vCPU"
        meta["device"] = f"CPU {cpu_model_name()}, {os.cpu_count()} logical cores"
    try:
        meta["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        meta["commit"] = None
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON, the Markdown table and the logs (default $OUT, else ./gpu-check-out)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="phantom, prepared data and runs (default /tmp/unet-gpu-check, /tmp/unet-gpu-check-dry)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="the whole command's deadline in seconds (default 360; 240 for --dry-run)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        choices=STEP_NAMES,
        default=list(STEP_NAMES),
        help="run only these steps (in the fixed order); e.g. a rerun of what was skipped",
    )
    p.add_argument(
        "--resume-ablation",
        type=Path,
        default=None,
        help="an ablate.json an earlier command returned: the ablation keeps its runs and does the rest",
    )
    p.add_argument(
        "--ablation-microbatch",
        type=int,
        default=None,
        help="the ablation's fixed microbatch (default: where auto settled earlier in this command, "
        "else auto); a resumed ablation needs the value its first command used",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for the phantom, its preparation and the MONAI cache (default: every core)",
    )
    p.add_argument("--dry-run", action="store_true", help="every step at a tiny size on the CPU")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu-check-out")
    if args.work is None:
        args.work = Path("/tmp/unet-gpu-check-dry" if args.dry_run else "/tmp/unet-gpu-check")
    if args.budget_s is None:
        args.budget_s = 240.0 if args.dry_run else 360.0
    if args.resume_ablation is not None and not args.resume_ablation.is_file():
        p.error(f"--resume-ablation {args.resume_ablation}: no such file")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    deadline = started + args.budget_s
    sizes = dry_sizes(args.workers) if args.dry_run else gpu_sizes(args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if sizes.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU is visible; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "budget_s": args.budget_s,
        "dry_run": args.dry_run,
        "steps_asked": args.steps,
        "_started": started,
        **versions(sizes.device),
    }
    report = Report(args.out, meta)
    log = args.out / "gpu_check.log"
    log.write_text(
        f"gpu_check {meta['command']}\n{meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, "
        f"cuDNN {meta['cudnn']}, MONAI {meta['monai']}\n"
    )
    runner = Runner(log)
    paths = Paths(args.work.resolve(), args.out.resolve(), sizes)
    phantom = PhantomJob(paths, args.workers, runner)
    ctx = Context(args, sizes, paths, runner, phantom, deadline)

    def stop(signum, frame):  # the outer time limit: keep what was measured
        if runner.current is not None:
            kill_group(runner.current)
        report.data["meta"]["stopped_by"] = signal.Signals(signum).name
        report.write()
        trim_log(log)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    print(
        f"gpu_check: {meta['device']}; torch {meta['torch']} CUDA {meta['cuda']} cuDNN {meta['cudnn']}; "
        f"budget {args.budget_s:.0f} s; writing {args.out}",
        flush=True,
    )
    if NEEDS_PHANTOM & set(args.steps):
        phantom.start()
    for name in STEP_NAMES:
        if name not in args.steps:
            continue
        budget, minimum = sizes.steps[name].budget, sizes.steps[name].minimum
        if name in NEEDS_PHANTOM:
            if phantom.result.get("status") not in ("ok", "failed"):
                phantom.wait(max(deadline - time.monotonic(), 0))
            report.record("phantom", {**phantom.result})
            if phantom.result.get("status") != "ok":
                report.record(name, {"status": "skipped", "reason": "no phantom (see phantom.log)"})
                continue
        left = deadline - time.monotonic()
        if left < minimum:
            report.record(name, {"status": "skipped", "reason": f"{left:.0f} s left, needs {minimum:.0f} s"})
            print(f"[{name}] skipped: {left:.0f} s left", flush=True)
            continue
        timeout = min(budget, left)
        print(f"[{name}] running (limit {timeout:.0f} s)", flush=True)
        began, cpu_before = time.monotonic(), children_cpu_s()
        try:
            result = STEPS[name](ctx, timeout)
        except Exception as exc:  # noqa: BLE001 - one broken step must not lose the others' figures
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        result.setdefault("wall_s", time.monotonic() - began)
        result["wall_s"] = round(result["wall_s"], 1)
        result["limit_s"] = round(timeout, 1)
        # CPU seconds of the step's processes (the phantom's too while it is being made): on a shared
        # machine this, not the wall time, says what a quiet one would take.
        result["cpu_s"] = round(children_cpu_s() - cpu_before, 1)
        report.record(name, result)
        shown = "; ".join(
            f"{f['what']} {_fmt(f.get('ours'))}" + (f" vs {_fmt(f.get('peer'))}" if f.get("peer") else "")
            for f in result.get("figures", [])[:4]
        )
        print(
            f"[{name}] {result['status']} in {result['wall_s']:.0f} s"
            f"{' (' + result['reason'] + ')' if result.get('reason') else ''}{': ' + shown if shown else ''}",
            flush=True,
        )
    if phantom.thread is not None and phantom.result.get("status") == "running":
        phantom.wait(5)
    if phantom.thread is not None:
        report.record("phantom", {**phantom.result})
    report.write()
    trim_log(log)
    trim_log(args.out / "phantom.log")
    print((args.out / "gpu_check.md").read_text(), flush=True)
    failed = [n for n, s in report.data["steps"].items() if s["status"] in ("failed",)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
