"""The composition root: the typed settings the commands receive carry the values the commands read from
the resolved config before, and no command module outside the composition root reads the config."""

import ast
import json
from pathlib import Path

import pytest
import torch

from unet_trainer.commands.builders import (
    CONVENTION_KEYS,
    build_conventions,
    build_cv_settings,
    build_eval_settings,
    build_inference_model,
    build_split_settings,
    finish_rule,
    process_group_device,
    save_folder,
)
from unet_trainer.commands.datasets import build_prepare_settings, with_dataset
from unet_trainer.config.components import describe_model, output_mode
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.data.prepare import PrepareSettings
from unet_trainer.data.schemes import SCHEMES
from unet_trainer.evaluation.postprocessing import MetricSettings
from unet_trainer.training.losses import OutputMode

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
COMMANDS = ROOT / "unet_trainer" / "commands"
CLI = ROOT / "unet_trainer" / "cli"
# The composition root: the only modules that read the resolved config.
COMPOSITION_ROOT = {"builders.py", "datasets.py", "resume.py", "train.py"}


@pytest.fixture(scope="module")
def cfg():
    return resolve_config(DEMO, ["data.target_spacing=[1.0, 1.5, 2.0]", "eval.lesion_wise=true", "data.fold=1"])


def test_the_model_conventions_are_the_values_an_ensemble_compared(cfg):
    conventions = build_conventions(cfg)
    assert conventions.named() == [(name, value(cfg)) for name, value in CONVENTION_KEYS]
    assert conventions.output_mode == output_mode(cfg["loss"]).value == "softmax classes"
    assert conventions.num_classes == describe_model(cfg["model"]).num_classes
    assert conventions.in_channels == describe_model(cfg["model"]).in_channels
    assert conventions.dle_labels == cfg["data"]["dle_labels"]
    assert conventions.target_spacing == cfg["data"]["target_spacing"] == [1.0, 1.5, 2.0]
    assert not conventions.region_mode
    regions = resolve_config(DEMO, ["loss={region_dice_bce: {}}", "model.unet.num_classes=3"])
    assert build_conventions(regions).region_mode is (output_mode(regions["loss"]) is OutputMode.REGIONS) is True


def test_the_eval_settings_carry_the_eval_section(cfg):
    settings = build_eval_settings(cfg)
    ev = cfg["eval"]
    # Lesion settings the config leaves unset are the label scheme's (the phantom's: BraTS 2021, 3 and 50 mm3).
    assert ev["lesion_dilation"] is None and ev["lesion_min_volume"] is None
    lesion = settings.lesion
    assert (settings.empty_policy, lesion.dilation_iterations, lesion.min_lesion_volume, settings.lesion_wise) == (
        ev["empty_policy"],
        3,
        50.0,
        True,
    )
    assert settings.scheme is SCHEMES["brats2021"]
    # The overrides unet-cv scores its folds with: every eval key, the device and the precision.
    expected = [f"eval.{k}={json.dumps(v)}" for k, v in ev.items()]
    expected += [f"device={json.dumps(cfg['device'])}", f"precision={json.dumps(cfg['precision'])}"]
    assert list(settings.overrides) == expected
    assert settings.metric_settings("lesion_dice") == MetricSettings("lesion_dice", 3, 50.0, ev["empty_policy"])


@pytest.mark.parametrize(
    "scheme, overrides, expected",
    [
        ("brats2023-met", [], (1, 2.0, {}, "brats2023")),
        ("brats2024-gli", [], (3, 20.0, {"ET": 10.0, "RC": 10.0}, "brats2023")),
        ("brats2024-gli", ["eval.lesion_min_volume=7", "eval.lesion_dilation=0"], (0, 7.0, {}, "brats2023")),
    ],
)
def test_lesion_settings_follow_the_scheme_unless_set(scheme, overrides, expected):
    cfg = resolve_config(DEMO, [f"data.scheme={scheme}", *overrides])
    lesion = build_eval_settings(cfg).lesion
    assert (
        lesion.dilation_iterations,
        lesion.min_lesion_volume,
        dict(lesion.region_min_volume),
        lesion.definition,
    ) == (expected)


def test_the_split_settings_name_the_validation_cases_as_before(cfg):
    split = build_split_settings(cfg)
    data = cfg["data"]
    assert (split.fold, split.num_folds, split.split_file, split.data_path) == (
        1,
        data["num_folds"],
        data["split_file"],
        data["path"],
    )
    assert (split.tag, split.where) == ("val-fold1", f"fold 1 of {data['num_folds']}")
    with_file = build_split_settings(resolve_config(DEMO, ["data.split_file=/x/split.json"]))
    assert (with_file.tag, with_file.where) == ("val", "/x/split.json")


def test_the_cv_settings_carry_what_unet_cv_read(cfg):
    settings = build_cv_settings(cfg)
    assert settings.cv_dir == save_folder(cfg) == Path(cfg["save_folder"])
    assert settings.split == build_split_settings(cfg) and settings.eval == build_eval_settings(cfg)
    assert settings.device_type == process_group_device(cfg["device"])
    duration, stopper = settings.finish
    assert str(duration) == str(finish_rule(cfg)[0]) == cfg["max_duration"]
    assert (stopper is None) is (cfg["callbacks"].get("early_stopper") is None)
    assert process_group_device("cpu") == "cpu"
    assert process_group_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_inference_settings_of_a_checkpoints_config(cfg, tmp_path):
    assert build_prepare_settings(cfg) == PrepareSettings.from_config(cfg["data"])
    assert build_prepare_settings(cfg).target_spacing == (1.0, 1.5, 2.0)
    device, model = build_inference_model(cfg)
    assert device.type in ("cpu", "cuda") and model.num_classes == build_conventions(cfg).num_classes
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            build_inference_model({**cfg, "device": "cuda"})
    other = with_dataset(cfg, tmp_path / "other", "msd")
    assert other["data"]["path"] == str(tmp_path / "other") and other["data"]["format"] == "msd"
    assert other["data"]["prepared_path"] is None and other["data"]["split_file"] is None
    assert cfg["data"]["path"] != other["data"]["path"]  # the loaded model's config stays as it was


def config_reads(source: str) -> list[int]:
    """The lines that read a config: a subscript of a name ``cfg`` or of an attribute ``.cfg``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            value = node.value
            if (isinstance(value, ast.Name) and value.id == "cfg") or (
                isinstance(value, ast.Attribute) and value.attr == "cfg"
            ):
                found.append(node.lineno)
    return sorted(found)


def test_the_check_sees_a_config_read():
    assert config_reads("x = cfg['data']['fold']\ny = loaded.cfg['eval']\nz = other['cfg']") == [1, 2]


def test_only_the_composition_root_reads_the_config():
    modules = sorted(COMMANDS.glob("*.py")) + sorted(CLI.glob("*.py"))
    assert {p.name for p in modules} >= COMPOSITION_ROOT
    reads = {
        f"{path.parent.name}/{path.name}": lines
        for path in modules
        if not (path.parent == COMMANDS and path.name in COMPOSITION_ROOT)
        and (lines := config_reads(path.read_text(encoding="utf-8")))
    }
    assert not reads, f"config reads outside the composition root ({sorted(COMPOSITION_ROOT)}): {reads}"
    root_reads = sum(len(config_reads((COMMANDS / name).read_text(encoding="utf-8"))) for name in COMPOSITION_ROOT)
    assert root_reads > 0  # the check sees the reads where they are allowed
