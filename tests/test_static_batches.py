"""``drop_last``: every training step the same shape (what CUDA graphs need), resume still exact."""

import pytest
import torch
from conftest import ROOT, script_module

from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.data.loader import ContinuousBatchSampler, EpochSampler
from unet_trainer.training.trainer import Callback


def epochs_of(sampler: ContinuousBatchSampler, batches: int) -> list[list[tuple[int, int]]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(batches)]


def test_drop_last_cuts_the_same_permutation_into_full_batches_only():
    """10 cases at batch 4: 3 batches (4, 4, 2) per epoch, or 2 full ones with the last 2 cases of
    each epoch's permutation left out; the batches that remain are the same ones."""
    partial = ContinuousBatchSampler(EpochSampler(10, seed=3), 4)
    full = ContinuousBatchSampler(EpochSampler(10, seed=3), 4, drop_last=True)
    assert (partial.batches_per_epoch, full.batches_per_epoch) == (3, 2)
    kept = epochs_of(full, 6)  # three epochs
    cut = epochs_of(partial, 9)
    assert all(len(batch) == 4 for batch in kept)
    assert kept == [batch for index, batch in enumerate(cut) if index % 3 != 2]
    # The left-out cases differ between epochs (each epoch draws its own permutation).
    left_out = [{case for case, _ in cut[epoch * 3 + 2]} for epoch in range(3)]
    assert len({frozenset(cases) for cases in left_out}) > 1


def test_drop_last_resumes_mid_epoch_at_the_same_batches():
    straight = epochs_of(ContinuousBatchSampler(EpochSampler(10, seed=3), 4, drop_last=True), 6)
    resumed = ContinuousBatchSampler(EpochSampler(10, seed=3), 4, drop_last=True)
    resumed.set_position(1, 1)  # epoch 1, after its first batch: overall batch 3
    assert epochs_of(resumed, 3) == straight[3:]


class BatchSizes(Callback):
    def __init__(self):
        self.sizes = []

    def batch_start(self, state):
        self.sizes.append(state.batch[0].shape[0])


def test_training_with_drop_last_takes_full_steps_and_resumes_exactly(tiny_config, tmp_path):
    """The tiny config's fold has 4 training cases: at batch 3 every epoch is one full step."""
    common = ("train_batch_size=3", "drop_last=true", "eval_interval=0ep")
    sizes = BatchSizes()
    straight = run_training(
        tiny_config("max_duration=4ba", *common, run_dir=tmp_path / "straight"), progress=False, extra_callbacks=[sizes]
    )
    assert sizes.sizes == [3, 3, 3, 3] and straight["epoch"] == 4  # one step per epoch
    run_training(tiny_config("max_duration=2ba", *common, run_dir=tmp_path / "split"), progress=False)
    torch.manual_seed(999)  # disturb the global streams: resume must restore them
    resumed = run_training(tiny_config("max_duration=4ba", *common, run_dir=tmp_path / "split"), progress=False)
    assert resumed["resumed_from"] is not None and resumed["batch"] == 4
    a = straight["state"].unwrapped_model.state_dict()
    b = resumed["state"].unwrapped_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drop_last_with_a_fold_smaller_than_the_batch_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="drop_last.*4 samples per rank.*batch of 5"):
        run_training(tiny_config("train_batch_size=5", "drop_last=true", "max_duration=1ba"), progress=False)


def test_the_fast_recipe_drops_the_partial_batch_and_composers_keeps_it():
    assert resolve_config(ROOT / "configs" / "brats.yaml", ["recipe=fast"])["drop_last"] is True
    assert resolve_config(ROOT / "configs" / "brats.yaml")["drop_last"] is False


def test_bench_train_counts_the_steps_drop_last_leaves():
    with script_module("bench_train") as bench:
        cfg = resolve_config(ROOT / "configs" / "brats.yaml", ["recipe=fast"])
        plan = bench.recipe_plan(cfg, 387)
        # 200 epochs of 6 full steps of 64: 3 samples of the 387 left out each epoch.
        assert (plan.steps, plan.samples) == (200 * 6, 200 * 6 * 64)
        assert bench.epoch_steps(387, 64, drop_last=False) == 7 and bench.epoch_steps(387, 64, drop_last=True) == 6


def test_loader_prefetch_is_bounded_in_bytes(tiny_config, tmp_path):
    """Small batches keep 4 per worker; BraTS-size ones (2.1 GiB each) one per worker, not 32 batches
    (69 GiB) of shared memory for 8 workers."""
    from unet_trainer.data.loader import PatchDataset, build_train_loader, prefetch_batches

    brats_batch = 64 * 128**3 * (4 * 4 + 1)
    assert prefetch_batches(8, brats_batch) == 1 and prefetch_batches(2, 4 * 32**3 * 17) == 4
    assert prefetch_batches(8, 2**28) == 4 and prefetch_batches(8, 2**29) == 2
    summary = run_training(tiny_config("max_duration=1ba", "eval_interval=0ep"), progress=False)
    prepared = summary["prepared"]
    dataset = PatchDataset(prepared, [f"BraTS2021_{i:05d}" for i in range(2)], (16, 16, 16), 0.4)
    assert dataset.sample_bytes() == 16**3 * (4 * 4 + 1)
    assert build_train_loader(dataset, 2, 0, num_workers=2, pin_memory=False).prefetch_factor == 4
    assert dataset._cases == {}  # nothing opened in the main process travels to the workers
