"""A checkpoint written by the flat-layout package, before the stage folders, still resumes and predicts
bit for bit (tests/fixtures/premove: the checkpoint after 2 batches of the tiny config, the weights of a
straight 3-batch run and the logits of the 2-batch model, all written by that version; make.py says how)."""

import shutil
from pathlib import Path

import pytest
import torch

from unet_trainer.commands.loading import load_model
from unet_trainer.commands.train import run_training

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "premove"


@pytest.fixture
def one_thread():
    # The fixture was written with one thread: CPU reductions may group differently with more.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def expected() -> dict:
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


def test_an_old_checkpoint_resumes_bit_exactly(tiny_config, tmp_path, one_thread, expected):
    checkpoint = tmp_path / "old" / "ep1-ba2-rank0.pt"
    checkpoint.parent.mkdir()
    shutil.copyfile(FIXTURE / checkpoint.name, checkpoint)
    summary = run_training(
        tiny_config("max_duration=3ba", f"load_path={checkpoint}", "autoresume=false", run_dir=tmp_path / "run"),
        progress=False,
    )
    assert summary["resumed_from"] is not None and summary["batch"] == 3
    weights = summary["state"].unwrapped_model.state_dict()
    assert list(weights) == list(expected["weights_after_3ba"])
    for key, value in expected["weights_after_3ba"].items():
        assert torch.equal(weights[key], value), key


def test_an_old_checkpoint_loads_and_predicts_the_same_logits(tmp_path, one_thread, expected):
    checkpoint = tmp_path / "ep1-ba2-rank0.pt"
    shutil.copyfile(FIXTURE / checkpoint.name, checkpoint)
    loaded = load_model(checkpoint, ["device=cpu"])
    generator = torch.Generator().manual_seed(expected["input_seed"])
    x = torch.randn(1, 4, 16, 16, 16, generator=generator)
    with torch.no_grad():
        logits = loaded.model.eval()(x)
    logits = logits if torch.is_tensor(logits) else logits[0]
    assert torch.equal(logits, expected["logits_at_2ba"])
