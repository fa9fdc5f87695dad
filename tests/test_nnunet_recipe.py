"""nnU-Net's recipe: ``configs/brats-nnunet.yaml`` resolves to nnU-Net v2's default trainer on BraTS, and a short
run of it (phantom data, a small net) trains with every nnU-Net transform on and resumes exactly."""

from __future__ import annotations

import torch
from conftest import ROOT, tiny_overrides
from test_engine import same_weights, weights

from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config

CONFIG = ROOT / "configs" / "brats-nnunet.yaml"
# A net deep enough for a deep-supervision head, the phantom, an epoch of 2 batches.
SMALL = (
    "data.path=null",
    "model.unet.filters=[4, 8, 16]",
    "model.unet.kernel_sizes=[3, 3, 3]",
    "model.unet.strides=[1, 2, 2]",
    "model.unet.deep_supervision_heads=1",
    "data.batches_per_epoch=2",
    "eval.mirror_tta=false",
    # The poly decay over a fixed span: over "the whole run" it would change with max_duration, which is
    # what the interrupted run below changes to stop early.
    "schedulers=[{poly: {power: 0.9, t_max: 4ba}}]",
    # Every transform fires on every sample, so each one's draws take part in the resume.
    *(f"augmentation.{name}.p=1" for name in ("channel_blur", "channel_brightness", "low_resolution", "gamma")),
    "augmentation.rotate_scale.p_rotation=1",
    "augmentation.rotate_scale.p_scale=1",
)


def test_the_config_is_nnunet_s_default_trainer_on_brats():
    cfg = resolve_config(CONFIG)
    assert cfg["optimizer"] == {"sgd": {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}}
    assert cfg["schedulers"] == [{"poly": {"power": 0.9, "t_max": None}}]
    assert (cfg["max_duration"], cfg["train_batch_size"], cfg["grad_clip_norm"]) == ("1000ep", 2, 12.0)
    assert list(cfg["loss"]) == ["region_dice_bce"] and cfg["model"]["unet"]["num_classes"] == 3
    assert cfg["model"]["unet"]["deep_supervision"] and cfg["model"]["unet"]["deep_supervision_heads"] == 3
    data = cfg["data"]
    assert (data["batches_per_epoch"], data["oversampling"], data["patch_size"]) == (250, 0.33, [128, 128, 128])
    aug = cfg["augmentation"]
    assert (aug["rotate_scale"]["p_rotation"], aug["rotate_scale"]["p_scale"], aug["rotate_scale"]["scale"]) == (
        0.2,
        0.2,
        [0.7, 1.4],
    )
    probabilities = {name: aug[name]["p"] for name in ("noise", "channel_blur", "low_resolution", "gamma")}
    assert probabilities == {"noise": 0.1, "channel_blur": 0.2, "low_resolution": 0.25, "gamma": 0.3}
    assert aug["inverted_gamma"]["p"] == 0.1 and aug["blur"]["p"] == aug["brightness"]["p"] == 0.0
    assert cfg["eval"]["mirror_tta"]


def test_a_short_run_trains_with_every_transform_and_resumes_exactly(cache_root, tmp_path):
    def config(duration: str, run: str) -> dict:
        return resolve_config(CONFIG, tiny_overrides(cache_root, tmp_path / run, *SMALL, f"max_duration={duration}"))

    straight = run_training(config("4ba", "a"), progress=False)
    assert straight["batch"] == 4 and straight["state"].timestamp.epoch == 2  # epochs of 2 batches
    assert all(torch.isfinite(v).all() for v in weights(straight).values() if v.is_floating_point())
    run_training(config("2ba", "b"), progress=False)
    resumed = run_training(config("4ba", "b"), progress=False)
    assert same_weights(weights(resumed), weights(straight))
