"""The component registries: every name a config may choose is one registry line; a callback, a
schedule, a logger destination or a loss added with its line alone is checked, built and run; the
loss declares what the outputs mean; one Field.check speaks for the config and the transforms."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import torch
from torch import nn

from unet_trainer.commands.builders import (
    build_callbacks,
    build_evaluator,
    build_logger_destinations,
    build_loss,
    build_scheduler,
)
from unet_trainer.commands.loading import CONVENTION_KEYS
from unet_trainer.commands.train import run_training
from unet_trainer.config import components
from unet_trainer.config.components import describe_model, output_mode
from unet_trainer.config.config import CALLBACKS, SCHEDULERS, resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.schema import F, FieldError, NonNegative, PositiveInt, Setting, fields_of
from unet_trainer.data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from unet_trainer.training import callbacks as cb
from unet_trainer.training import reporting
from unet_trainer.training.augment import AUGMENTATIONS
from unet_trainer.training.batch_transform import SettingError
from unet_trainer.training.intensity import GaussianBlur
from unet_trainer.training.loggers import FileLogger, LoggerDestination
from unet_trainer.training.losses import OutputMode, labels_to_regions
from unet_trainer.training.trainer import Callback, State

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


# ---------------------------------------------------------------------------------------------
# Unknown names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, registries",
    [
        ("model={{name}: {}}", "model.{name}", [components.MODELS]),
        ("optimizer={{name}: {}}", "optimizer.{name}", [components.OPTIMIZERS]),
        ("schedulers=[{{name}: {}}]", "schedulers[0].{name}", [components.SCHEDULERS]),
        ("loss={{name}: {}}", "loss.{name}", [components.LOSSES]),
        ("callbacks.{name}={}", "callbacks.{name}", [components.CALLBACKS, components.LOGGER_DESTINATIONS]),
        ("algorithms.{name}={}", "algorithms.{name}", [components.ALGORITHMS]),
    ],
)
def test_each_registry_refuses_an_unknown_name_in_one_line_naming_the_key_and_the_names(override, key, registries):
    # A name close to none (a close one is answered with the closest: test_config, test_components).
    name = "x" * 40
    override, key = override.replace("{name}", name), key.replace("{name}", name)
    with pytest.raises(ConfigError) as err:
        resolve_config(None, [override])
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"command line: unknown key '{key}'; valid keys here: "), line
    listed = line.split("valid keys here: ", 1)[1].split(", ")
    assert {name for registry in registries for name in registry} <= set(listed)


def test_the_registries_names_do_not_collide_in_the_callbacks_section():
    assert not set(components.CALLBACKS) & set(components.LOGGER_DESTINATIONS)


# ---------------------------------------------------------------------------------------------
# Schedules: derived settings, one build path
# ---------------------------------------------------------------------------------------------


def test_the_derived_scheduler_settings_equal_the_hand_written_ones_they_replace():
    positive = dict(minimum=0.0)
    assert dict(SCHEDULERS) == {
        "constant": {"factor": F("float", 1.0, **positive)},
        "cosine": {"min_factor": F("float", 0.0, **positive), "t_max": F("duration", None, nullable=True)},
        "poly": {"power": F("float", 0.9, **positive), "t_max": F("duration", None, nullable=True)},
        "linear_warmup": {"duration": F("duration", "1ep"), "start_factor": F("float", 0.0, **positive)},
    }


def test_every_schedule_gets_its_durations_in_batches():
    cfg = resolve_config(
        None,
        [
            "train_batch_size=4",
            "schedulers=[{linear_warmup: {duration: 2ep}}, {cosine: {t_max: 40sp, min_factor: 0.1}}, {poly: {}}]",
        ],
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(cfg, optimizer, batches_per_epoch=3, total_batches=30)
    warmup, cosine, poly = scheduler.schedule.schedules
    assert (warmup.duration, warmup.start_factor) == (6, 0.0)  # 2 epochs of 3 batches
    assert (cosine.t_max, cosine.min_factor) == (10, 0.1)  # 40 samples of 4 a batch
    assert (poly.t_max, poly.power) == (None, 0.9)


# ---------------------------------------------------------------------------------------------
# A callback and a schedule added with one registry line each
# ---------------------------------------------------------------------------------------------


class RecordLR(Callback):
    """A toy callback: the learning rate after every step, written to ``<run>/lrs.txt`` at the end."""

    def __init__(self, digits: PositiveInt = 6, *, run_dir: Path, is_writer: bool = True):
        self.digits, self.path, self.is_writer = digits, Path(run_dir) / "lrs.txt", is_writer
        self.lrs: list[float] = []

    def batch_end(self, state: State) -> None:
        self.lrs.append(round(state.optimizer.param_groups[0]["lr"], self.digits))

    def fit_end(self, state: State) -> None:
        if self.is_writer:
            self.path.write_text(" ".join(map(str, self.lrs)))


@dataclass(frozen=True)
class Halving:
    """A toy schedule: the factor halves every ``every`` batches (a duration in the config)."""

    every: Annotated[int, Setting.defaulting("2ba", kind="duration")]
    floor: NonNegative = 0.0

    def __call__(self, batch: int, total: int) -> float:
        return max(0.5 ** (batch // self.every), self.floor)


def test_a_callback_and_a_schedule_added_with_one_registry_line_are_checked_built_and_run(
    monkeypatch, tiny_config, tmp_path
):
    monkeypatch.setitem(components.CALLBACKS, "record_lr", RecordLR)  # the callback's one line
    monkeypatch.setitem(components.SCHEDULERS, "halving", Halving)  # the schedule's one line
    assert CALLBACKS["record_lr"] == {"digits": F("int", 6, minimum=1)}
    assert SCHEDULERS["halving"] == {"every": F("duration", "2ba"), "floor": F("float", 0.0, minimum=0.0)}
    with pytest.raises(ConfigError, match=r"^command line: 'callbacks.record_lr.digits' = 0 is not an integer >= 1$"):
        tiny_config("callbacks.record_lr.digits=0")
    with pytest.raises(ConfigError, match=r"'schedulers\[0\].halving.every' = 'often' is not a duration"):
        tiny_config("schedulers=[{halving: {every: often}}]")

    cfg = tiny_config(
        "callbacks.record_lr={digits: 8}",
        "schedulers=[{halving: {}}]",
        "max_duration=6ba",
        "optimizer.radam.lr=0.004",
        run_dir=tmp_path / "run",
    )
    assert cfg["callbacks"]["record_lr"] == {"digits": 8} and cfg["schedulers"] == [
        {"halving": {"every": "2ba", "floor": 0.0}}
    ]
    summary = run_training(cfg, progress=False)
    lrs = [float(x) for x in (tmp_path / "run" / "lrs.txt").read_text().split()]
    # After step b the scheduler has taken b steps: lr = 0.004 * 0.5 ** (b // 2).
    assert lrs == [round(0.004 * 0.5 ** (b // 2), 8) for b in range(1, 7)] and summary["batch"] == 6


# ---------------------------------------------------------------------------------------------
# Where callbacks are built: declared by the component
# ---------------------------------------------------------------------------------------------


class NoEvaluator:
    case_view = None


def test_the_builder_reads_where_a_callback_runs_from_the_callback(tmp_path):
    cfg = resolve_config(None, ["callbacks.overlays.every=2"])
    cfg["callbacks"] = {"lr_monitor": {}, "progress_plot": {}, "overlays": cfg["callbacks"]["overlays"]}
    on_writer = build_callbacks(cfg, tmp_path, is_main=True, progress=False, evaluator=NoEvaluator())
    elsewhere = build_callbacks(cfg, tmp_path, is_main=False, progress=False, evaluator=NoEvaluator())
    without_evaluation = build_callbacks(cfg, tmp_path, is_main=True, progress=False, evaluator=None)

    def configured(callbacks):
        return [type(c) for c in callbacks[:-4]]  # the last four are the always-on ones

    assert cb.ProgressPlot.writer_only and reporting.OverlayWriter.needs_evaluator
    assert configured(on_writer) == [cb.LRMonitor, cb.ProgressPlot, reporting.OverlayWriter]
    assert configured(elsewhere) == [cb.LRMonitor, reporting.OverlayWriter]
    assert configured(without_evaluation) == [cb.LRMonitor, cb.ProgressPlot]
    plot, overlays = on_writer[1], on_writer[2]
    assert plot.path == tmp_path / "progress.png" and overlays.folder == tmp_path / "overlays"
    assert overlays.every == 2 and overlays.is_writer and not elsewhere[1].is_writer
    logger = on_writer[-2]
    assert logger.overlays is overlays and elsewhere[-2].destinations == []


class ListDestination(LoggerDestination):
    """A toy destination: its records in a list."""

    def __init__(self, prefix: str = "toy", *, config: dict):
        self.prefix, self.run_name, self.records = prefix, config["run_name"], []

    def truncate_after(self, step: int) -> None:
        pass

    def log_metrics(self, metrics, step, counters) -> None:
        self.records.append((step, dict(metrics)))

    def close(self, stop_reason) -> None:
        pass


def test_a_logger_destination_added_with_one_registry_line_is_checked_and_built(monkeypatch, tmp_path):
    monkeypatch.setitem(components.LOGGER_DESTINATIONS, "list", ListDestination)  # its one line
    with pytest.raises(ConfigError, match=r"'callbacks.list.prefix' = 3 is not a string"):
        resolve_config(None, ["callbacks.list.prefix=3"])
    cfg = resolve_config(None, ["callbacks.list.prefix=mine", "run_name=named"])
    file_logger, destination = build_logger_destinations(cfg, tmp_path)
    assert isinstance(file_logger, FileLogger) and isinstance(destination, ListDestination)
    assert (destination.prefix, destination.run_name) == ("mine", "named")


# ---------------------------------------------------------------------------------------------
# The output mode, declared by the loss
# ---------------------------------------------------------------------------------------------


class ToyRegionLoss(nn.Module):
    """A toy region loss: binary cross-entropy over the label scheme's trained regions."""

    output_mode = OutputMode.REGIONS

    def __init__(self, weight: NonNegative = 1.0, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]):
        super().__init__()
        self.weight, self.scheme = weight, scheme

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        regions = labels_to_regions(target, self.scheme.trained_region_classes())
        return self.weight * nn.functional.binary_cross_entropy_with_logits(logits.float(), regions)


def test_a_region_loss_added_with_one_registry_line_makes_everything_read_regions(monkeypatch, tmp_path):
    monkeypatch.setitem(components.LOSSES, "toy_regions", ToyRegionLoss)  # its one line
    cfg = resolve_config(DEMO, ["loss={toy_regions: {weight: 0.5}}", "model.unet.num_classes=3"])
    classes = resolve_config(DEMO, [])
    assert output_mode(cfg["loss"]) is OutputMode.REGIONS and output_mode(classes["loss"]) is OutputMode.CLASSES
    # The evaluator (training's and unet-eval's), and what an ensemble's models must agree on.
    evaluator = build_evaluator(cfg, tmp_path, [], torch.device("cpu"))
    assert evaluator.region_mode and not build_evaluator(classes, tmp_path, [], torch.device("cpu")).region_mode
    region_mode = dict(CONVENTION_KEYS)["region mode (loss)"]
    assert (region_mode(cfg), region_mode(classes)) == ("sigmoid regions", "softmax classes")
    # The loss's output mode, not its name, makes the model need one output per trained region of the
    # label scheme, which the builder supplies.
    model = describe_model(cfg["model"])
    built = build_loss(cfg, model).loss
    assert built.weight == 0.5 and built.scheme is SCHEMES["brats2021"]
    wrong = resolve_config(DEMO, ["loss={toy_regions: {}}"])
    with pytest.raises(ConfigError) as err:
        build_loss(wrong, describe_model(wrong["model"]))
    assert str(err.value) == "loss toy_regions predicts WT, TC and ET: set model.unet.num_classes=3"
    post = resolve_config(DEMO, ["loss={toy_regions: {}}", "data.scheme=brats2024-gli", "model.unet.num_classes=4"])
    assert build_loss(post, describe_model(post["model"])).loss.scheme is SCHEMES["brats2024-gli"]


def test_the_built_in_losses_declare_their_modes_and_the_region_check_keeps_its_message():
    assert components.LOSSES["dice_ce"].output_mode is OutputMode.CLASSES
    assert components.LOSSES["region_dice_bce"].output_mode is OutputMode.REGIONS
    cfg = resolve_config(DEMO, ["loss={region_dice_bce: {}}"])
    with pytest.raises(ConfigError) as err:
        build_loss(cfg, describe_model(cfg["model"]))
    assert str(err.value) == "loss region_dice_bce predicts WT, TC and ET: set model.unet.num_classes=3"


# ---------------------------------------------------------------------------------------------
# One Field.check for the config and the transforms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, yaml_value, value",
    [
        ("sigma", "[-0.5, 1.5]", (-0.5, 1.5)),
        ("sigma", "[0.5, .inf]", (0.5, math.inf)),
        ("sigma", "[0.5]", (0.5,)),
        ("sigma", "wide", "wide"),
        ("p", "1.5", 1.5),
        ("p", ".nan", math.nan),
        ("p", "true", True),
    ],
)
def test_the_transforms_and_the_config_say_the_same_through_field_check(setting, yaml_value, value):
    assert AUGMENTATIONS["blur"] is GaussianBlur
    field = fields_of(GaussianBlur)[setting]
    with pytest.raises(FieldError) as checked:
        field.check(value)
    expected = checked.value.expected
    with pytest.raises(SettingError) as transform:
        GaussianBlur(**{setting: value})
    assert str(transform.value) == f"GaussianBlur.{setting} must be {expected}, got {value!r}"
    with pytest.raises(ConfigError) as config:
        resolve_config(None, [f"augmentation.blur.{setting}={yaml_value}"])
    assert str(config.value).startswith(f"command line: 'augmentation.blur.{setting}' = ")
    assert str(config.value).endswith(f" is not {expected}")
