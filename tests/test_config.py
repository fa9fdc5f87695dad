"""Config parsing: layers and precedence, overrides, errors, durations, and every shipped YAML."""

from pathlib import Path

import pytest
import yaml

from unet_trainer.cli.train import main as train_main
from unet_trainer.config.config import SCHEMA, defaults, resolve_config
from unet_trainer.config.engine import ConfigError, config_differences, parse_overrides
from unet_trainer.core.schema import Duration, Field
from unet_trainer.training.augment import AUGMENTATIONS

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def layered(tmp_path):
    """A recipe and a config naming it, in a configs/ + recipes/ layout."""
    write(
        tmp_path / "recipes" / "r.yaml",
        "optimizer: {radam: {lr: 0.005, weight_decay: 0.01}}\ntrain_batch_size: 16\nmax_duration: 7ep\n",
    )
    return write(tmp_path / "configs" / "c.yaml", "recipe: r\ntrain_batch_size: 8\nseed: 3\n")


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("200ep", Duration(200, "ep")),
        ("1000ba", Duration(1000, "ba")),
        ("64sp", Duration(64, "sp")),
        (12, Duration(12, "ep")),
        ("12", Duration(12, "ep")),
        (" 3 ba ", Duration(3, "ba")),
        (0, Duration(0, "ep")),
    ],
)
def test_duration_parsing(raw, expected):
    assert Duration.parse(raw) == expected
    assert Duration.parse(str(expected)) == expected


@pytest.mark.parametrize("raw", ["10epochs", "ep", "1.5ep", -3, True, None, "10 tok", [1]])
def test_duration_rejects(raw):
    with pytest.raises(ValueError):
        Duration.parse(raw)


def test_precedence_defaults_recipe_config_cli(layered):
    cfg = resolve_config(layered, ["seed=9"])
    assert cfg["optimizer"]["radam"]["lr"] == 0.005  # recipe
    assert cfg["optimizer"]["radam"]["eps"] == 1e-8  # default inside the recipe's choice
    assert cfg["train_batch_size"] == 8  # config beats recipe
    assert cfg["max_duration"] == "7ep"  # recipe beats default
    assert cfg["seed"] == 9  # command line beats config
    assert cfg["run_name"] == "c" and cfg["save_folder"] == "runs/c"


@pytest.mark.parametrize(
    "args",
    [
        ["--optimizer.radam.lr", "2e-3"],
        ["--optimizer.radam.lr=2e-3"],
        ["optimizer.radam.lr=2e-3"],
    ],
)
def test_override_forms(layered, args):
    cfg = resolve_config(layered, args)
    assert cfg["optimizer"]["radam"]["lr"] == pytest.approx(2e-3)
    assert cfg["optimizer"]["radam"]["weight_decay"] == 0.01  # merging the same component keeps siblings


def test_override_values_are_yaml_scalars_and_lists(layered):
    cfg = resolve_config(
        layered,
        [
            "data.patch_size=[32, 64, 96]",
            "autoresume=false",
            "max_duration=10ba",
            "schedulers=[{cosine: {min_factor: 0.1}}]",
            "run_name=x",
        ],
    )
    assert cfg["data"]["patch_size"] == [32, 64, 96]
    assert cfg["autoresume"] is False
    assert cfg["max_duration"] == "10ba"
    assert cfg["schedulers"] == [{"cosine": {"min_factor": 0.1, "t_max": None}}]
    assert cfg["save_folder"] == "runs/x"


def test_choosing_another_component_replaces_the_choice(layered):
    cfg = resolve_config(layered, ["optimizer.sgd.lr=0.1"])
    assert cfg["optimizer"] == {"sgd": {"lr": 0.1, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}}


def test_set_of_components_switch_on_and_off(layered):
    base = resolve_config(layered)["callbacks"]
    assert set(base) == {"lr_monitor", "speed_monitor", "memory_monitor", "progress_plot", "overlays"}  # on by default
    cfg = resolve_config(layered, ["callbacks.early_stopper.patience=4", "callbacks.tensorboard={}"])
    assert cfg["callbacks"] == {**base, "early_stopper": {"patience": 4, "min_delta": 0.0}, "tensorboard": {}}
    cfg = resolve_config(layered, ["callbacks.lr_monitor=null", "callbacks.progress_plot=null"])
    assert set(cfg["callbacks"]) == {"speed_monitor", "memory_monitor", "overlays"}
    cfg = resolve_config(layered, ["algorithms.ema.decay=0.9"])
    assert cfg["algorithms"] == {"ema": {"decay": 0.9}}


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["optimizer.radam.lrr=1"], "did you mean 'optimizer.radam.lr'"),
        (["optimiser.radam.lr=1"], "did you mean 'optimizer'"),
        (["data.patchsize=[1,2,3]"], "did you mean 'data.patch_size'"),
        (["optimizer.radamm.lr=1"], "did you mean 'optimizer.radam'"),
        (["callbacks.lr_monitr={}"], "did you mean 'callbacks.lr_monitor'"),
    ],
)
def test_unknown_key_names_closest(layered, args, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config(layered, args)
    message = str(info.value)
    assert message.startswith("command line: unknown key") and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["optimizer.radam.lr=fast"], "'optimizer.radam.lr' = 'fast' is not a number"),
        (["seed=1.5"], "'seed' = 1.5 is not an integer"),
        (["max_duration=10epochs"], "is not a duration"),
        (["precision=fp64"], "is not one of fp32, amp_fp16, amp_bf16"),
        (["data.patch_size=[1,2]"], "of length 3"),
        (["autoresume=maybe"], "is not true or false"),
        (["data.oversampling=1.5"], "in [0.0, 1.0]"),
        (["device_train_microbatch_size=big"], "an integer or 'auto'"),
    ],
)
def test_wrong_type_names_key_value_and_expected(layered, args, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config(layered, args)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_errors_name_the_file(tmp_path):
    bad = write(tmp_path / "configs" / "bad.yaml", "model:\n  filtres: [8, 16]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.filtres'; did you mean 'model\.filters'"):
        resolve_config(bad)
    broken = write(tmp_path / "configs" / "broken.yaml", "seed: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        resolve_config(broken)
    with pytest.raises(ConfigError, match="no such config file"):
        resolve_config(tmp_path / "missing.yaml")
    no_recipe = write(tmp_path / "configs" / "n.yaml", "recipe: nope\n")
    with pytest.raises(ConfigError, match="recipe 'nope' not found; known recipes: .*composer-unet"):
        resolve_config(no_recipe)


def test_recipe_may_not_hold_data_or_model(tmp_path):
    write(tmp_path / "recipes" / "leaky.yaml", "data: {fold: 1}\n")
    cfg = write(tmp_path / "configs" / "c.yaml", "recipe: leaky\n")
    with pytest.raises(ConfigError, match="'data' does not belong in a recipe"):
        resolve_config(cfg)


def test_cross_key_rules(layered):
    with pytest.raises(ConfigError, match="'data.fold' = 5 must be below 'data.num_folds' = 5"):
        resolve_config(layered, ["data.fold=5"])
    # The old path still works; the message names the setting's path in the model section.
    with pytest.raises(ConfigError, match="'model.unet.strides' has 2 entries but filters has 6"):
        resolve_config(layered, ["model.strides=[1,2]"])
    with pytest.raises(ConfigError, match="nesterov' = true needs 'optimizer.sgd.momentum' > 0"):
        resolve_config(layered, ["optimizer.sgd.momentum=0"])
    with pytest.raises(ConfigError, match="low <= high"):
        resolve_config(layered, ["augmentation.noise.std=[0.5, 0.1]"])


def test_augmentation_schema_is_derived_from_the_transforms_with_the_same_shape_and_defaults():
    probability = dict(minimum=0.0, maximum=1.0)

    def low_high(low: float, high: float) -> Field:
        return Field("float_list", [low, high], length=2, minimum=0.0)

    expected = {
        "enabled": Field("bool", True),
        "flip": {"p": Field("float", 0.5, **probability)},
        "noise": {"p": Field("float", 0.15, **probability), "std": low_high(0.0, 0.33)},
        "blur": {"p": Field("float", 0.15, **probability), "sigma": low_high(0.5, 1.5)},
        "brightness": {"p": Field("float", 0.15, **probability), "scale": low_high(0.7, 1.3)},
        "contrast": {"p": Field("float", 0.15, **probability), "scale": low_high(0.65, 1.5)},
    }
    # nnU-Net's, appended and off by default; their own tests check their sections' fields.
    appended = ["rotate_scale", "channel_blur", "channel_brightness", "channel_contrast", "low_resolution"]
    appended += ["inverted_gamma", "gamma"]
    assert list(SCHEMA["augmentation"])[len(expected) :] == appended
    assert SCHEMA["augmentation"]["rotate_scale"] == {
        "p_rotation": Field("float", 0.0, **probability),
        "rotation_deg": Field("float", 30.0, minimum=0.0, maximum=180.0),
        "p_scale": Field("float", 0.0, **probability),
        "scale": low_high(0.7, 1.4),
    }
    expected.update({name: SCHEMA["augmentation"][name] for name in appended})
    assert SCHEMA["augmentation"] == expected
    assert list(SCHEMA["augmentation"]) == list(expected)  # the YAML's order too
    assert list(SCHEMA["augmentation"]) == ["enabled", *AUGMENTATIONS]
    assert {name: section for name, section in defaults()["augmentation"].items() if name not in appended} == {
        "enabled": True,
        "flip": {"p": 0.5},
        "noise": {"p": 0.15, "std": [0.0, 0.33]},
        "blur": {"p": 0.15, "sigma": [0.5, 1.5]},
        "brightness": {"p": 0.15, "scale": [0.7, 1.3]},
        "contrast": {"p": 0.15, "scale": [0.65, 1.5]},
    }


def test_augmentation_errors_are_one_line_naming_the_key(layered):
    with pytest.raises(ConfigError) as err:
        resolve_config(layered, ["augmentation.noise.std=[0.5, 0.1]"])
    assert str(err.value) == "'augmentation.noise.std' = [0.5, 0.1] must be [low, high] with low <= high"
    with pytest.raises(ConfigError) as err:
        resolve_config(layered, ["augmentation.blur.sigma=[-0.5, 1.5]"])
    assert str(err.value) == (
        "command line: 'augmentation.blur.sigma' = [-0.5, 1.5] is not a list of numbers of length 2 "
        "with every item >= 0.0 (item -0.5)"
    )
    with pytest.raises(ConfigError, match=r"'augmentation.flip.p' = 1.5 is not a number in \[0.0, 1.0\]"):
        resolve_config(layered, ["augmentation.flip.p=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'augmentation.contrast.scal'; did you mean"):
        resolve_config(layered, ["augmentation.contrast.scal=[0.5, 1.5]"])
    cfg = resolve_config(layered, ["augmentation.brightness.scale=[0.9, 0.9]", "augmentation.enabled=false"])
    assert cfg["augmentation"]["brightness"] == {"p": 0.15, "scale": [0.9, 0.9]}


def test_override_token_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--seed"])
    with pytest.raises(ConfigError, match="is not an override"):
        parse_overrides(["seed"])


def test_cli_errors_are_one_line_and_non_zero(layered, capsys):
    assert train_main([str(layered), "optimizer.radam.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'optimizer.radam.lr'" in err and "Traceback" not in err


def test_print_config_shows_resolved_values(layered, capsys):
    assert train_main([str(layered), "--print-config", "--seed", "5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["optimizer"]["radam"]["lr"] == 0.005


def test_brats_config_has_composer_hyperparameters(capsys):
    assert train_main([str(ROOT / "configs" / "brats.yaml"), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optimizer"] == {"radam": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-4}}
    assert cfg["schedulers"] == [{"constant": {"factor": 1.0}}]
    assert cfg["train_batch_size"] == 64 and cfg["max_duration"] == "200ep"
    assert cfg["data"]["fold"] == 0 and cfg["data"]["num_folds"] == 5
    assert cfg["data"]["patch_size"] == [128, 128, 128] and cfg["precision"] == "amp_bf16"
    model = cfg["model"]["unet"]
    assert model["filters"] == [32, 64, 128, 256, 320, 320] and model["strides"] == [1, 2, 2, 2, 2, 2]
    assert (model["norm"], model["activation"], model["negative_slope"], model["upsample"], model["in_channels"]) == (
        "instance",
        "leaky_relu",
        0.01,
        "transposed",
        4,
    )


SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "unet-train" in first
    if path.parent.name == "configs":
        cfg = resolve_config(path)
    else:
        cfg = resolve_config(None, [f"recipe={path}"])
    assert cfg["run_name"]


def test_shipped_yaml_found():
    assert any(p.name == "demo.yaml" for p in SHIPPED) and any(p.name == "composer-unet.yaml" for p in SHIPPED)


def test_config_differences():
    a = defaults()
    b = defaults()
    b["optimizer"]["radam"]["lr"] = 5.0
    b["seed"] = 1
    assert config_differences(a, b) == ["optimizer.radam.lr", "seed"]
