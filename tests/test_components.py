"""The component registries and the model selector: schemas derived from the components'
signatures (pinned to the hand-written ones they replaced), ``model: {unet: {...}}`` with the old
flat section still read, old override paths, and the checks that ask the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unet_trainer.commands.builders import build_algorithms, build_loss, build_optimizer
from unet_trainer.config import components, engine
from unet_trainer.config.components import upgrade_config
from unet_trainer.config.config import (
    ALGORITHMS,
    CALLBACKS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    defaults,
    resolve_config,
    resolve_from_base,
)
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.schema import F, Field

ROOT = Path(__file__).resolve().parent.parent

PROB = dict(minimum=0.0, maximum=1.0)
POSITIVE = dict(minimum=0.0)

# The schemas as they were written by hand before they were derived: the derivation must not
# change a default, a bound or a choice.
HAND_WRITTEN_OPTIMIZERS = {
    "radam": {
        "lr": F("float", 1e-3, **POSITIVE),
        "betas": F("float_list", [0.9, 0.999], length=2),
        "eps": F("float", 1e-8, **POSITIVE),
        "weight_decay": F("float", 0.0, **POSITIVE),
    },
    "adam": {
        "lr": F("float", 1e-3, **POSITIVE),
        "betas": F("float_list", [0.9, 0.999], length=2),
        "eps": F("float", 1e-8, **POSITIVE),
        "weight_decay": F("float", 0.0, **POSITIVE),
    },
    "adamw": {
        "lr": F("float", 1e-3, **POSITIVE),
        "betas": F("float_list", [0.9, 0.999], length=2),
        "eps": F("float", 1e-8, **POSITIVE),
        "weight_decay": F("float", 1e-2, **POSITIVE),
    },
    "sgd": {
        "lr": F("float", 1e-2, **POSITIVE),
        "momentum": F("float", 0.99, **POSITIVE),
        "nesterov": F("bool", True),
        "weight_decay": F("float", 3e-5, **POSITIVE),
    },
}
HAND_WRITTEN_LOSSES = {
    "dice_ce": {"dice_weight": F("float", 1.0, **POSITIVE), "ce_weight": F("float", 1.0, **POSITIVE)},
    "region_dice_bce": {"dice_weight": F("float", 1.0, **POSITIVE), "bce_weight": F("float", 1.0, **POSITIVE)},
}
HAND_WRITTEN_CALLBACKS = {
    "lr_monitor": {},
    "speed_monitor": {"window": F("int", 10, minimum=1)},
    "memory_monitor": {},
    "early_stopper": {"patience": F("int", 10, minimum=1), "min_delta": F("float", 0.0, **POSITIVE)},
    "progress_plot": {},
    "tensorboard": {},
    "overlays": {"cases": F("int_or_all", 16), "every": F("int", 1, minimum=1)},
    "mlflow": {
        "tracking_uri": F("str", "file:./mlruns"),
        "experiment": F("str", "unet-trainer"),
        "run_name": F("str", None, nullable=True),
        "log_checkpoints": F("bool", False),
    },
}
HAND_WRITTEN_ALGORITHMS = {
    "channels_last": {},
    "ema": {"decay": F("float", 0.999, minimum=0.0, maximum=1.0)},
    "compile": {"mode": F("str", "default", choices=("default", "reduce-overhead", "max-autotune"))},
    "cudnn_benchmark": {},
}
HAND_WRITTEN_UNET = {
    "spatial_dims": F("int", 3, choices=None, minimum=2, maximum=3),
    "in_channels": F("int", 4, minimum=1),
    "num_classes": F("int", 4, minimum=1),
    "filters": F("int_list", [32, 64, 128, 256, 320, 320]),
    "kernel_sizes": F("int_list", [3, 3, 3, 3, 3, 3]),
    "strides": F("int_list", [1, 2, 2, 2, 2, 2]),
    "norm": F("str", "instance", choices=("instance", "batch", "group", "none")),
    "norm_groups": F("int", 8, minimum=1),
    "activation": F("str", "leaky_relu", choices=("leaky_relu", "relu")),
    "negative_slope": F("float", 0.01, **POSITIVE),
    "upsample": F("str", "transposed", choices=("transposed", "linear")),
    "downsample": F("str", "strided_conv", choices=("strided_conv", "max_pool")),
    "residual": F("bool", False),
    "deep_supervision": F("bool", False),
    "deep_supervision_heads": F("int", 2, minimum=1),
    "dropout": F("float", 0.0, **PROB),
    "padding": F("str", "same", choices=("same", "valid")),
    "gradient_checkpointing": F("bool", False),
}


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """The old-shape note is printed once per source and process: start each test with none printed."""
    monkeypatch.setattr(engine, "_NOTED_BARE", set())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Schemas from signatures
# ---------------------------------------------------------------------------------------------


def test_derived_schemas_equal_the_hand_written_ones_they_replace():
    assert OPTIMIZERS == HAND_WRITTEN_OPTIMIZERS
    assert LOSSES == HAND_WRITTEN_LOSSES
    assert CALLBACKS == HAND_WRITTEN_CALLBACKS
    assert ALGORITHMS == HAND_WRITTEN_ALGORITHMS
    assert MODELS["unet"] == HAND_WRITTEN_UNET and list(MODELS["unet"]) == list(HAND_WRITTEN_UNET)
    # Every registered component has a schema of its own, and nothing else does.
    assert set(MODELS) == set(components.MODELS) == {"unet", "resenc_unet"}
    assert list(CALLBACKS) == [*components.CALLBACKS, *components.LOGGER_DESTINATIONS]
    assert list(ALGORITHMS) == list(components.ALGORITHMS)


def test_the_resenc_schema_is_its_own_signature():
    resenc = MODELS["resenc_unet"]
    assert resenc["blocks_per_stage"] == Field("int_list", [1, 3, 4, 6, 6, 6], minimum=1)
    assert resenc["decoder_convs"] == Field("int", 1, minimum=1)
    assert resenc["deep_supervision"] == Field("bool", True)
    assert "upsample" not in resenc and "padding" not in resenc  # transposed convs, same padding only


def test_builders_call_the_registered_components_with_their_settings():
    cfg = defaults()
    model = torch.nn.Linear(2, 2)
    radam = build_optimizer(cfg, model.parameters())
    assert isinstance(radam, torch.optim.RAdam)
    group = radam.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    cfg["optimizer"] = {"sgd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=3e-5)}
    sgd = build_optimizer(cfg, model.parameters()).param_groups[0]
    assert (sgd["lr"], sgd["momentum"], sgd["nesterov"]) == (0.1, 0.9, True)
    cfg["algorithms"] = {"ema": {"decay": 0.9}, "channels_last": {}, "compile": {"mode": "max-autotune"}}
    ema, channels_last, compiled = build_algorithms(cfg)
    assert ema.decay == 0.9 and type(channels_last).__name__ == "ChannelsLast" and compiled.mode == "max-autotune"


def test_the_loss_builder_asks_the_model():
    cfg = defaults()
    net = {"filters": [4, 8, 16, 16], "kernel_sizes": [3] * 4, "strides": [1, 2, 2, 2]}
    with torch.device("meta"):
        plain = components.build_model({"unet": net})
        supervised = components.build_model({"unet": {**net, "deep_supervision": True}})
    assert build_loss(cfg, plain).weights is None
    assert build_loss(cfg, supervised).weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    cfg["loss"] = {"region_dice_bce": {"dice_weight": 1.0, "bce_weight": 1.0}}
    with pytest.raises(ConfigError, match=r"set model\.unet\.num_classes=3"):
        build_loss(cfg, plain)


# ---------------------------------------------------------------------------------------------
# The selector and the old shape
# ---------------------------------------------------------------------------------------------

OLD_SECTION = "model:\n  filters: [8, 16]\n  kernel_sizes: [3, 3]\n  strides: [1, 2]\n  norm: batch\n"
NEW_SECTION = "model:\n  unet:\n    filters: [8, 16]\n    kernel_sizes: [3, 3]\n    strides: [1, 2]\n    norm: batch\n"


def test_an_old_flat_model_section_is_read_as_unet_with_one_note(tmp_path, capsys):
    old = write(tmp_path / "configs" / "old.yaml", "data: {patch_size: [16, 16, 16]}\n" + OLD_SECTION)
    new = write(tmp_path / "configs" / "new.yaml", "data: {patch_size: [16, 16, 16]}\n" + NEW_SECTION)
    from_old = resolve_config(old)
    err = capsys.readouterr().err
    assert from_old["model"] == resolve_config(new)["model"] and list(from_old["model"]) == ["unet"]
    assert capsys.readouterr().err == ""  # the new shape needs no note
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {old}: 'model' without a model name (the old shape) is read as 'model: {{unet: ...}}' "
        "('model.filters' is 'model.unet.filters'); write it so to silence this note"
    ]
    resolve_config(old)  # once per file, not once per read
    assert "note:" not in capsys.readouterr().err


def test_old_override_paths_keep_working_and_say_the_new_path(capsys):
    demo = ROOT / "configs" / "demo.yaml"
    old = resolve_config(demo, ["model.filters=[8, 16]", "model.kernel_sizes=[3, 3]", "model.strides=[1, 2]"])
    err = capsys.readouterr().err
    assert "'model.filters' is 'model.unet.filters'" in err and err.count("\n") <= 1
    new = resolve_config(
        demo, ["model.unet.filters=[8, 16]", "model.unet.kernel_sizes=[3, 3]", "model.unet.strides=[1, 2]"]
    )
    assert old == new and new["model"]["unet"]["filters"] == [8, 16]
    assert new["model"]["unet"]["norm"] == "instance"  # the config's other settings are kept: same model, merged
    # Old and new paths on one command line join; one setting given both ways is refused.
    mixed = resolve_config(demo, ["model.unet.filters=[8, 16]", "model.kernel_sizes=[3, 3]", "model.strides=[1, 2]"])
    assert mixed == new
    with pytest.raises(ConfigError, match=r"both 'model.filters' and 'model.unet.filters' are given"):
        resolve_config(demo, ["model.unet.filters=[8, 16]", "model.filters=[8, 16]"])


def test_an_old_path_never_switches_another_chosen_model():
    resenc = ROOT / "configs" / "brats-resenc.yaml"
    with pytest.raises(ConfigError) as info:
        resolve_config(resenc, ["model.deep_supervision=false"])
    assert str(info.value) == (
        "command line: 'model.deep_supervision' is the old path of 'model.unet.deep_supervision', but the model "
        "chosen is 'resenc_unet'; write 'model.resenc_unet.deep_supervision' "
        "(or 'model.unet.deep_supervision' to choose unet)"
    )
    cfg = resolve_config(resenc, ["model.resenc_unet.deep_supervision=false"])
    assert cfg["model"]["resenc_unet"]["deep_supervision"] is False
    with pytest.raises(ConfigError, match=r"'model.filters' is the old path .* but 'model.resenc_unet' is chosen here"):
        resolve_config(None, ["model.resenc_unet.norm=batch", "model.filters=[8, 16]"])
    # Naming another model replaces the choice, as for every one-of section.
    switched = resolve_config(resenc, ["model.unet.norm=batch"])
    assert (
        list(switched["model"]) == ["unet"]
        and switched["model"]["unet"]["filters"] == HAND_WRITTEN_UNET["filters"].default
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["model.unet.filtres=[1]"],
            "command line: unknown key 'model.unet.filtres'; did you mean 'model.unet.filters'?",
        ),
        (["model.filtres=[1]"], "command line: unknown key 'model.filtres'; did you mean 'model.filters'?"),
        (["model.unte.filters=[1]"], "command line: unknown key 'model.unte'; did you mean 'model.unet'?"),
        (["model.resenc.filters=[1]"], "command line: unknown key 'model.resenc'; did you mean 'model.resenc_unet'?"),
        (
            ["model.resenc_unet.blocks=[1]"],
            "command line: unknown key 'model.resenc_unet.blocks'; did you mean 'model.resenc_unet.blocks_per_stage'?",
        ),
        (
            ["model.unet.norm=layer"],
            "command line: 'model.unet.norm' = 'layer' is not one of instance, batch, group, none",
        ),
        (
            ["model.resenc_unet.blocks_per_stage=[1, 0]"],
            "command line: 'model.resenc_unet.blocks_per_stage' = [1, 0] is not a list of integers with every item "
            ">= 1 (item 0)",
        ),
    ],
)
def test_model_key_errors_are_one_line_with_the_closest_key(args, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, args)
    assert str(info.value) == message


def test_a_bare_section_typo_names_the_file(tmp_path):
    bad = write(tmp_path / "configs" / "bad.yaml", "model:\n  unte:\n    filters: [8, 16]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.unte'; did you mean 'model\.unet'\?"):
        resolve_config(bad)


# ---------------------------------------------------------------------------------------------
# Checks that ask the model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["model.unet.norm=group", "model.unet.norm_groups=3", "model.unet.filters=[4, 8]"]
            + ["model.unet.kernel_sizes=[3, 3]", "model.unet.strides=[1, 2]", "data.patch_size=[16, 16, 16]"],
            "'model.unet.norm_groups' (3, for norm='group') must divide every filter count; 4 is not divisible by it",
        ),
        (
            ["model.resenc_unet.strides=[1, 2]"],
            "'model.resenc_unet.strides' has 2 entries but filters has 6; give one entry per stage",
        ),
        (
            ["model.resenc_unet.kernel_sizes=[3, 3, 4, 3, 3, 3]"],
            "'model.resenc_unet.kernel_sizes': size-preserving convs need odd kernel sizes, got [3, 3, 4, 3, 3, 3]",
        ),
    ],
)
def test_model_argument_errors_are_config_errors_naming_the_setting(args, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, args)
    assert str(info.value) == message


def test_the_patch_check_asks_the_model_whichever_it_is():
    with pytest.raises(ConfigError) as info:
        resolve_config(ROOT / "configs" / "brats-resenc.yaml", ["data.patch_size=[128, 100, 128]"])
    assert str(info.value) == (
        "'data.patch_size' = [128, 100, 128]: each entry must be a multiple of 32, the model's total stride "
        "(the product of model.resenc_unet.strides); nearest valid: 100 -> 96 or 128, "
        "e.g. [128, 96, 128] or [128, 128, 128]"
    )
    # A 2D model checks the slice axes only; a valid-padding model gets its own message.
    with pytest.raises(ConfigError, match=r"^'data.patch_size' = \[1, 190, 160\]: each entry must be a multiple of 32"):
        resolve_config(ROOT / "configs" / "brats-2d.yaml", ["data.patch_size=[1, 190, 160]"])
    with pytest.raises(ConfigError, match=r"\[1, 318, 316\] does not fit the model: input size 318 on axis 2"):
        resolve_config(ROOT / "configs" / "unet2015-2d.yaml", ["data.patch_size=[1, 318, 316]"])
    with pytest.raises(ConfigError, match="must start with 1 for a 2D model"):
        resolve_config(
            ROOT / "configs" / "brats-2d.yaml", ["model.unet.spatial_dims=2", "data.patch_size=[2, 192, 160]"]
        )


# ---------------------------------------------------------------------------------------------
# Stored configs of earlier versions
# ---------------------------------------------------------------------------------------------


def test_a_stored_config_with_the_old_section_resolves_and_upgrades(capsys):
    stored = resolve_config(ROOT / "configs" / "demo.yaml")
    old = {**stored, "model": stored["model"]["unet"]}  # as an earlier version saved it
    assert resolve_from_base(old, ["seed=1"], source="x.pt (stored config)")["model"] == stored["model"]
    assert "note: x.pt (stored config): 'model' without a model name" in capsys.readouterr().err
    assert upgrade_config(old, "y.pt") == stored
    assert upgrade_config(stored, "z.pt") == stored and "z.pt" not in capsys.readouterr().err
