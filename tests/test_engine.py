"""The engine: events, schedules, microbatching, EMA, logs and plots, signals, SIGKILL resume, DDP."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, hide_package, tiny_overrides

from unet_trainer.commands.train import run_training
from unet_trainer.core.checkpoint import load_checkpoint
from unet_trainer.core.checkpoints import list_checkpoints
from unet_trainer.training.schedules import BatchScheduler, ComposedSchedule, Constant, Cosine, LinearWarmup, Poly
from unet_trainer.training.trainer import Callback, Engine, Event


def weights(summary) -> dict:
    return {k: v.clone() for k, v in summary["state"].unwrapped_model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class EventRecorder(Callback):
    def __init__(self):
        self.events = []

    def run_event(self, event, state):
        self.events.append(event)


def test_events_fire_in_order(tiny_config):
    recorder = EventRecorder()
    run_training(tiny_config("max_duration=1ep", "eval_interval=1ep"), progress=False, extra_callbacks=[recorder])
    ev = recorder.events
    assert ev[0] == Event.INIT and ev[1] == Event.FIT_START and ev[-1] == Event.FIT_END
    first_batch = ev[ev.index(Event.BATCH_START) : ev.index(Event.BATCH_END) + 1]
    assert first_batch == [
        Event.BATCH_START,
        Event.AFTER_FORWARD,
        Event.AFTER_LOSS,
        Event.AFTER_BACKWARD,
        Event.BATCH_END,
    ]
    assert ev.count(Event.BATCH_END) == 2 and ev.count(Event.EPOCH_START) == ev.count(Event.EPOCH_END) == 1
    # Evaluation at the epoch boundary comes before EPOCH_END, so the checkpoint sees its result.
    assert ev.index(Event.EVAL_END) < ev.index(Event.EPOCH_END)


def test_every_event_has_a_documented_no_op_method_on_the_callback_base():
    for event in Event:
        method = getattr(Callback, event.value, None)
        assert callable(method), f"Callback has no method for {event}"
        assert method.__doc__ and method.__doc__.strip(), f"Callback.{event.value} has no docstring"
        assert Callback().run_event(event, object()) is None


@pytest.mark.parametrize("event", list(Event))
def test_a_callback_overriding_one_method_gets_exactly_that_event(event):
    seen = []
    only = type("Only", (Callback,), {event.value: lambda self, state: seen.append((event, state))})()
    state = object()  # the Engine hands the state through untouched
    engine = Engine(state, callbacks=[only])
    for each in Event:
        engine.run(each)
    assert seen == [(event, state)]


def test_schedules_compose_and_resume_without_jump():
    assert Cosine()(0, 100) == 1.0 and abs(Cosine()(100, 100)) < 1e-12 and Cosine()(50, 100) == pytest.approx(0.5)
    assert Poly(0.9)(50, 100) == pytest.approx(0.5**0.9) and Poly()(100, 100) == 0.0
    assert LinearWarmup(10)(0, 100) == 0.0 and LinearWarmup(10)(5, 100) == 0.5 and LinearWarmup(10)(10, 100) == 1
    schedule = ComposedSchedule([LinearWarmup(4), Cosine(), Constant(0.5)], total_batches=20)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = BatchScheduler(opt, schedule)
    lrs = []
    for _ in range(10):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[3] == pytest.approx(2.0 * 1.0 * Cosine()(4, 20) * 0.5)
    fresh_opt = torch.optim.SGD([param], lr=2.0)
    resumed = BatchScheduler(fresh_opt, schedule)
    resumed.load_state_dict(sched.state_dict())
    assert fresh_opt.param_groups[0]["lr"] == lrs[-1]  # no learning-rate jump after resume


def test_lr_is_logged_per_step(tiny_config, tmp_path):
    run_training(
        tiny_config("max_duration=4ba", "schedulers=[{linear_warmup: {duration: 4ba}}]", "eval_interval=0ep"),
        progress=False,
    )
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    base = 3e-3  # configs/demo.yaml
    assert [r["lr/group0"] for r in train] == pytest.approx([base * 0.25, base * 0.5, base * 0.75, base])
    assert all("throughput/samples_per_sec" in r and "memory/peak_rss_gib" in r for r in train[1:])
    assert all(0 <= r["throughput/data_wait_fraction"] <= 1 for r in train[1:])


def test_auto_microbatch_halves_on_out_of_memory(tiny_config, tmp_path, monkeypatch):
    """A fake OOM whenever more than one sample goes through: 'auto' must settle on 1 and match it."""
    from unet_trainer.models.unet import UNet

    real_forward = UNet.forward

    def forward(self, x):
        if self.training and x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, x)

    monkeypatch.setattr(UNet, "forward", forward)
    auto = run_training(
        tiny_config("max_duration=2ba", "device_train_microbatch_size=auto", run_dir=tmp_path / "auto"), progress=False
    )
    assert auto["state"].extra_state["auto_microbatch"] == 1 and auto["batch"] == 2
    one = run_training(
        tiny_config("max_duration=2ba", "device_train_microbatch_size=1", run_dir=tmp_path / "one"), progress=False
    )
    assert same_weights(weights(auto), weights(one))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # without auto, the error is the user's to see
        run_training(tiny_config("max_duration=1ba", run_dir=tmp_path / "plain"), progress=False)


def test_auto_microbatch_frees_the_failed_attempt_before_retrying(tiny_config, tmp_path, monkeypatch):
    """After an OOM in backward the failed attempt's graph (its saved activations) must be released
    before the retry runs, or on a GPU the smaller microbatch runs out of memory again with it."""
    import weakref

    from ddp_worker import OutOfMemoryInBackward

    from unet_trainer.training.losses import DeepSupervisionLoss

    real_loss = DeepSupervisionLoss.forward
    failed: list = []  # weak references to the logits saved by failed attempts
    still_alive: list[bool] = []  # at each loss call, whether a failed attempt's logits live on

    def loss(self, outputs, target):
        still_alive.extend(ref() is not None for ref in failed)
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        if logits.shape[0] > 1:
            failed.append(weakref.ref(logits))
        return OutOfMemoryInBackward.apply(real_loss(self, outputs, target), logits)

    monkeypatch.setattr(DeepSupervisionLoss, "forward", loss)
    summary = run_training(
        tiny_config("max_duration=1ba", "device_train_microbatch_size=auto", "eval_interval=0ep"), progress=False
    )
    assert summary["state"].extra_state["auto_microbatch"] == 1 and summary["batch"] == 1
    assert failed and still_alive and not any(still_alive)


def test_microbatches_accumulate_to_the_batch_gradient(tiny_config, tmp_path):
    """With a per-sample-decomposable loss (CE only), 2 microbatches give the full batch's step."""
    common = ("max_duration=1ba", "loss.dice_ce.dice_weight=0", "optimizer.sgd.lr=0.1", "augmentation.enabled=false")
    full = run_training(tiny_config(*common, run_dir=tmp_path / "full"), progress=False)
    micro = run_training(
        tiny_config(*common, "device_train_microbatch_size=1", run_dir=tmp_path / "micro"), progress=False
    )
    a, b = weights(full), weights(micro)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_clipping_bounds_the_step(tiny_config, tmp_path):
    start = run_training(tiny_config("max_duration=0ba", run_dir=tmp_path / "start"), progress=False)
    clipped = run_training(
        tiny_config(
            "max_duration=1ba",
            "optimizer.sgd.lr=1.0",
            "optimizer.sgd.momentum=0.0",
            "optimizer.sgd.weight_decay=0.0",
            "optimizer.sgd.nesterov=false",
            "grad_clip_norm=1e-6",
            run_dir=tmp_path / "clipped",
        ),
        progress=False,
    )
    a, b = weights(start), weights(clipped)
    change = torch.sqrt(sum(((a[k] - b[k]).float() ** 2).sum() for k in a if a[k].is_floating_point()))
    assert 0 < change <= 1.01e-6


def test_ema_evaluates_averaged_weights_and_resumes_exactly(tiny_config, tmp_path):
    straight = run_training(
        tiny_config("max_duration=4ba", "algorithms.ema.decay=0.5", run_dir=tmp_path / "a"), progress=False
    )
    ema = straight["state"].extra_state["ema"]
    model = weights(straight)
    assert not same_weights(ema, model)  # an average, not the weights
    run_training(tiny_config("max_duration=2ba", "algorithms.ema.decay=0.5", run_dir=tmp_path / "b"), progress=False)
    resumed = run_training(
        tiny_config("max_duration=4ba", "algorithms.ema.decay=0.5", run_dir=tmp_path / "b"), progress=False
    )
    assert same_weights(resumed["state"].extra_state["ema"], ema) and same_weights(weights(resumed), model)


def test_progress_plot_and_tensorboard_are_written(tiny_config, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    run_training(tiny_config("max_duration=2ep", "callbacks.tensorboard={}"), progress=False)
    run = tmp_path / "run"
    png = run / "progress.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_optional_package_missing_is_a_clear_error(tiny_config, monkeypatch):
    from unet_trainer.config.engine import ConfigError

    hide_package(monkeypatch, "torch.utils.tensorboard")
    with pytest.raises(ConfigError, match=r"pip install 'unet-trainer\[tensorboard\]'"):
        run_training(tiny_config("max_duration=1ba", "callbacks.tensorboard={}"), progress=False)


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_trains_on_cpu(tiny_config, tmp_path, precision):
    summary = run_training(tiny_config("max_duration=2ba", f"precision={precision}"), progress=False)
    state = summary["state"]
    assert summary["batch"] == 2 and (state.scaler is not None) == (precision == "amp_fp16")
    assert all(torch.isfinite(v).all() for v in weights(summary).values() if v.is_floating_point())
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest-rank0.pt")
    assert (saved["scaler"] is not None) == (precision == "amp_fp16")


# ---------------------------------------------------------------------------------------------
# Separate processes: signals, SIGKILL, torchrun
# ---------------------------------------------------------------------------------------------


def train_command(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "unet_trainer.cli",
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        *tiny_overrides(cache, run_dir, *extra),
    ]


def child_env(threads: int | None = None) -> dict:
    """The child's environment; the same thread count as this process by default, since CPU
    kernels reduce in a thread-dependent order and bit-exact comparisons need the same one."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads or torch.get_num_threads()))


def wait_for(predicate, timeout: float = 120.0, process=None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended early: {process.communicate()}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigterm_saves_at_a_batch_boundary_and_exits_cleanly(cache_root, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(cache_root, run, "max_duration=500ba", "save_interval=1000ba", "eval_interval=0ep"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, process=proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Stopped early: received SIGTERM" in out
    saved = list_checkpoints(run / "checkpoints")
    assert len(saved) == 1
    state = load_checkpoint(saved[0])
    logged = [json.loads(l)["batch"] for l in metrics.read_text().splitlines()]
    assert state["timestamp"]["batch"] == logged[-1] >= 3 and state["timestamp"]["batch"] < 500


def test_sigkill_after_a_checkpoint_then_resume_is_exact(cache_root, tmp_path, tiny_config):
    """Killed with SIGKILL (no chance to clean up) after its 3rd checkpoint, the resumed run ends
    with weights identical to an uninterrupted run."""
    extra = ("max_duration=8ba", "save_interval=1ba", "eval_interval=0ep", "save_num_checkpoints_to_keep=-1")
    straight = run_training(tiny_config(*extra, run_dir=tmp_path / "straight"), progress=False)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        train_command(cache_root, run, *extra), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: len(list_checkpoints(run / "checkpoints")) >= 3, process=proc)
    proc.kill()
    proc.wait()
    done = len(list_checkpoints(run / "checkpoints"))
    assert done < 8, "the run finished before it could be killed"
    resumed = run_training(tiny_config(*extra, run_dir=run), progress=False)
    assert resumed["resumed_from"] is not None and resumed["batch"] == 8
    assert same_weights(weights(straight), weights(resumed))


def torchrun(cache_root: Path, run: Path, out: Path, *extra: str, env: dict | None = None) -> str:
    """Train the tiny config with 2 gloo processes under torchrun; returns their stderr."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(ROOT / "tests" / "ddp_worker.py"),
        str(out),
        *tiny_overrides(cache_root, run, *extra),
    ]
    result = subprocess.run(
        command, env={**child_env(threads=1), **(env or {})}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_torchrun_two_processes_agree_write_once_and_resume_consistently(cache_root, tmp_path):
    from unet_trainer.config.config import resolve_config

    # Prepare the data once in this process so the ranks only read it.
    run_training(
        resolve_config(
            ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, tmp_path / "warm", "max_duration=0ba")
        ),
        progress=False,
    )
    run, out = tmp_path / "ddp", tmp_path / "ranks"
    torchrun(cache_root, run, out, "max_duration=4ba", "save_interval=2ba", "eval_interval=2ba")
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert same_weights(rank0["model"], rank1["model"])
    assert rank0["eval_history"] == rank1["eval_history"] and len(rank0["eval_history"]) == 2
    assert rank0["batch"] == rank1["batch"] == 4 and rank0["sample"] == 8  # global batch 2 = 1 per rank
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["best-rank0.pt", "ep1-ba2-rank0.pt", "ep2-ba4-rank0.pt", "latest-rank0.pt"]
    # Each rank cut the slices of the validation cases it scored; rank 0 drew all of them.
    val = json.loads((run / "split.json").read_text())["val"]
    assert sorted(p.name for p in (run / "overlays").iterdir()) == sorted([f"{c}.png" for c in val] + ["summary.png"])
    saved = load_checkpoint(run / "checkpoints" / "ep2-ba4-rank0.pt")
    assert len(saved["rng_per_rank"]) == 2 and len(saved["augmenter_per_rank"]) == 2
    assert not torch.equal(
        saved["augmenter_per_rank"][0]["noise_generator"], saved["augmenter_per_rank"][1]["noise_generator"]
    )
    # Stopped after 2 steps and resumed to 4 by both ranks: the same weights as the straight run.
    split_run, split_out = tmp_path / "ddp_split", tmp_path / "ranks_split"
    torchrun(cache_root, split_run, split_out, "max_duration=2ba", "save_interval=2ba", "eval_interval=2ba")
    torchrun(cache_root, split_run, split_out, "max_duration=4ba", "save_interval=2ba", "eval_interval=2ba")
    resumed0 = torch.load(split_out / "rank0.pt", weights_only=True)
    resumed1 = torch.load(split_out / "rank1.pt", weights_only=True)
    assert resumed0["batch"] == 4
    assert same_weights(resumed0["model"], rank0["model"]) and same_weights(resumed1["model"], rank0["model"])


def test_torchrun_auto_microbatch_agrees_when_one_rank_runs_out_of_memory_in_backward(cache_root, tmp_path):
    """Rank 1 runs out of memory in backward at microbatch 2, rank 0 never does: a rank retrying
    alone would leave DDP's all-reduce half done (the next forward raises, or the ranks hang). Both
    ranks must settle on microbatch 1 together and match a run told to use 1."""
    from unet_trainer.config.config import resolve_config

    run_training(
        resolve_config(
            ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, tmp_path / "warm", "max_duration=0ba")
        ),
        progress=False,
    )
    settings = ("max_duration=2ba", "train_batch_size=4", "save_interval=0ep", "eval_interval=0ep")
    torchrun(
        cache_root,
        tmp_path / "auto",
        tmp_path / "auto-ranks",
        *settings,
        "device_train_microbatch_size=auto",
        env={"UNET_TEST_OOM_IN_BACKWARD_RANK": "1"},
    )
    torchrun(cache_root, tmp_path / "one", tmp_path / "one-ranks", *settings, "device_train_microbatch_size=1")
    auto = [torch.load(tmp_path / "auto-ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(tmp_path / "one-ranks" / "rank0.pt", weights_only=True)
    assert [a["auto_microbatch"] for a in auto] == [1, 1] and [a["batch"] for a in auto] == [2, 2]
    assert same_weights(auto[0]["model"], auto[1]["model"])
    assert same_weights(auto[0]["model"], one["model"])


def test_torchrun_channels_last_gradients_fit_the_ddp_buckets(cache_root, tmp_path):
    """DDP must be built after the channels-last conversion, or its buckets keep the old strides and
    every step copies each gradient in and out of them (the reducer warns then)."""
    from unet_trainer.config.config import resolve_config

    run_training(
        resolve_config(
            ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, tmp_path / "warm", "max_duration=0ba")
        ),
        progress=False,
    )
    stderr = torchrun(
        cache_root,
        tmp_path / "run",
        tmp_path / "ranks",
        "max_duration=1ba",
        "save_interval=0ep",
        "eval_interval=0ep",
        "algorithms.channels_last={}",
    )
    assert "Grad strides do not match bucket view strides" not in stderr
    model = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)["model"]
    assert any(
        t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
        for t in model.values()
    )  # the conversion did happen


def test_keep_n_checkpoints_latest_and_best(tiny_config, tmp_path):
    run_training(
        tiny_config("max_duration=5ba", "save_interval=1ba", "save_num_checkpoints_to_keep=2", "eval_interval=1ba"),
        progress=False,
    )
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["ep2-ba4-rank0.pt", "ep2-ba5-rank0.pt"]
    assert (folder / "latest-rank0.pt").resolve().name == "ep2-ba5-rank0.pt"
    best = load_checkpoint(folder / "best-rank0.pt")
    scores = [r["dice/mean"] for r in load_checkpoint(folder / "ep2-ba5-rank0.pt")["eval_history"]]
    assert best["extra_state"]["best_dice"] == max(scores)
    assert best["timestamp"]["batch"] == best["extra_state"]["best_batch"]


def test_partial_files_are_never_taken_for_checkpoints(tiny_config, tmp_path):
    run_training(tiny_config("max_duration=2ba"), progress=False)
    folder = tmp_path / "run" / "checkpoints"
    # What a crash mid-write leaves: a temporary file (never under a checkpoint's name) and a
    # 'latest' link to a file that a rotation removed.
    (folder / ".ep0-ba9-rank0.pt.abc.tmp").write_bytes(b"half a checkpoint")
    (folder / "latest-rank0.pt").unlink()
    (folder / "latest-rank0.pt").symlink_to("ep0-ba7-rank0.pt")
    resumed = run_training(tiny_config("max_duration=3ba"), progress=False)
    assert Path(resumed["resumed_from"]).name == "ep1-ba2-rank0.pt" and resumed["batch"] == 3


def test_load_weights_only_fine_tunes_from_fresh_counters(tiny_config, tmp_path):
    source = run_training(tiny_config("max_duration=2ba", run_dir=tmp_path / "source"), progress=False)
    ckpt = tmp_path / "source" / "checkpoints" / "ep1-ba2-rank0.pt"
    tuned = run_training(
        tiny_config("max_duration=0ba", f"load_path={ckpt}", "load_weights_only=true", run_dir=tmp_path / "tuned"),
        progress=False,
    )
    assert tuned["batch"] == 0 and same_weights(weights(tuned), weights(source))
    assert tuned["state"].optimizer.state_dict()["state"] == {}  # fresh optimizer, fresh schedule


def test_speed_algorithms_are_applied_at_init(tiny_config, monkeypatch):
    from unet_trainer.models.unet import UNet

    compiled = {}
    monkeypatch.setattr(UNet, "compile", lambda self, **kwargs: compiled.update(kwargs), raising=False)

    class BenchmarkFlag(Callback):
        seen: list[bool] = []

        def batch_end(self, state):
            self.seen.append(torch.backends.cudnn.benchmark)

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    summary = run_training(
        tiny_config(
            "max_duration=1ba",
            "algorithms.compile.mode=max-autotune",
            "algorithms.cudnn_benchmark={}",
            "algorithms.channels_last={}",
        ),
        progress=False,
        extra_callbacks=[BenchmarkFlag()],
    )
    assert compiled == {"mode": "max-autotune"}
    # On while training; the process-wide flag is given back at fit end.
    assert BenchmarkFlag.seen == [True] and torch.backends.cudnn.benchmark is False
    weight = next(p for p in summary["state"].unwrapped_model.parameters() if p.ndim == 5)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["amp_fp16", "amp_bf16"])
def test_cuda_training_with_every_gpu_path_resumes(tiny_config, tmp_path, monkeypatch, precision):
    """The CUDA-only paths end to end: side-stream prefetch from pinned memory, autocast (with the
    GradScaler for fp16), channels-last, auto microbatching, CUDA memory stats, and a resume that
    restores the CUDA random states (weights are not compared: cuDNN kernels are not bitwise
    deterministic, but the augmenter's generators are)."""
    if precision == "amp_bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    common = (
        "device=cuda",
        f"precision={precision}",
        "algorithms.channels_last={}",
        "device_train_microbatch_size=auto",
        "eval_interval=0ep",
    )
    straight = run_training(tiny_config("max_duration=3ba", *common, run_dir=tmp_path / "straight"), progress=False)
    run_training(tiny_config("max_duration=2ba", *common, run_dir=tmp_path / "split"), progress=False)
    resumed = run_training(tiny_config("max_duration=3ba", *common, run_dir=tmp_path / "split"), progress=False)
    assert resumed["resumed_from"] is not None and resumed["batch"] == straight["batch"] == 3
    assert straight["state"].device.type == "cuda" and (straight["state"].scaler is not None) == (
        precision == "amp_fp16"
    )
    for key, value in straight["state"].augmenter.state_dict().items():
        assert torch.equal(resumed["state"].augmenter.state_dict()[key], value), key
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss/train"]) and r["memory/peak_allocated_gib"] > 0 for r in train)


@pytest.mark.skipif(
    os.environ.get("UNET_TEST_COMPILE") != "1", reason="compiling takes ~30 s on CPU; UNET_TEST_COMPILE=1"
)
def test_compiled_training_matches_eager(tiny_config, tmp_path):
    eager = run_training(tiny_config("max_duration=2ba", run_dir=tmp_path / "eager"), progress=False)
    compiled = run_training(
        tiny_config("max_duration=2ba", "algorithms.compile={}", run_dir=tmp_path / "c"), progress=False
    )
    a, b = weights(eager), weights(compiled)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_sample_intervals_count_partial_batches(tiny_config, tmp_path):
    """Epochs of 4 cases at batch 3 are batches of 3 and 1 samples (3, 4, 7, 8 seen). Saving
    every 3 samples falls due when 3 and then 6 are reached (batches 1 and 3), not after the
    1-sample batch 2; the end of the run (batch 4) saves once more."""
    run_training(
        tiny_config(
            "max_duration=4ba",
            "train_batch_size=3",
            "save_interval=3sp",
            "save_num_checkpoints_to_keep=-1",
            "eval_interval=0ep",
        ),
        progress=False,
    )
    names = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["ep0-ba1-rank0.pt", "ep1-ba3-rank0.pt", "ep2-ba4-rank0.pt"]
