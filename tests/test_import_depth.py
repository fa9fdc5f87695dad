"""Short import chains: each stage's deepest module within its budget, the leaf modules the lower stages share,
and ``python -m unet_trainer.cli`` dispatching through the installed console scripts (importing no command)."""

from __future__ import annotations

import csv
import importlib.metadata
from functools import cache

import pytest
import torch
from test_architecture import PACKAGE, STAGES, _stage, import_graph

from unet_trainer.cli import __main__ as dispatch

# The deepest module each stage may have, counting levels as test_architecture does (a module importing nothing
# from the package is 1). The lower stages, everything up to and including config, stay within 5, so that the
# commands fit in two levels above the composition root and the command line in one above them (8 in all,
# test_architecture.MAX_DEPTH). Data's 4 is the layout registry over its layouts; training's 4 the augmentation
# registry (augment) over its transform modules (spatial, intensity) over their base; the other training modules,
# which the component registries import, stay within 3; config's 5 is the project's config over the registries.
STAGE_DEPTH = {"core": 3, "data": 4, "models": 3, "evaluation": 4, "training": 4, "config": 5}
LOWER_STAGES_DEPTH = 5

# Modules the lower stages share, that must stay leaves (nothing imported from the package).
LEAVES = (
    "core.schema",
    "data.schemes",
    "data.layouts.canonical",
    "training.prefetch",
    "cli.__main__",
)


def depths(graph: dict[str, frozenset[str]]) -> dict[str, int]:
    """Each module's level: 1 for a module importing nothing from the package, else one more than its deepest
    import (the graph has no cycle: test_architecture checks it)."""

    @cache
    def depth(module: str) -> int:
        return 1 + max((depth(target) for target in graph[module]), default=0)

    return {module: depth(module) for module in graph}


def _deepest(stage: str) -> tuple[int, str]:
    levels = depths(import_graph())
    return max((level, module) for module, level in levels.items() if _stage(module) == stage)


@pytest.mark.parametrize("stage", STAGE_DEPTH)
def test_each_lower_stage_stays_within_its_depth(stage):
    level, module = _deepest(stage)
    assert level <= STAGE_DEPTH[stage], f"{module} is {level} levels deep (budget {STAGE_DEPTH[stage]})"


def test_the_lower_stages_stay_within_their_budget():
    assert set(STAGE_DEPTH) == set(STAGES[: STAGES.index("config") + 1])
    assert max(_deepest(stage)[0] for stage in STAGE_DEPTH) <= LOWER_STAGES_DEPTH


def test_depths_count_levels():
    graph = {"a": frozenset({"b", "c"}), "b": frozenset({"c"}), "c": frozenset()}
    assert depths(graph) == {"a": 3, "b": 2, "c": 1}


@pytest.mark.parametrize("module", LEAVES)
def test_shared_modules_are_leaves(module):
    assert import_graph()[f"{PACKAGE}.{module}"] == frozenset()


def test_the_trainer_needs_no_data_module_and_the_callbacks_no_evaluator():
    graph = import_graph()
    assert not {m for m in graph[f"{PACKAGE}.training.trainer"] if _stage(m) == "data"}
    assert f"{PACKAGE}.evaluation.evaluation" not in graph[f"{PACKAGE}.training.callbacks"]


def test_the_case_table_is_one_writer_for_the_evaluator_and_the_callbacks(tmp_path):
    from unet_trainer.evaluation import cases, evaluation
    from unet_trainer.training import callbacks

    assert evaluation.write_cases_csv is cases.write_cases_csv is callbacks.write_cases_csv
    path = tmp_path / "deep" / "cases.csv"
    cases.write_cases_csv(path, [{"case_id": "a", "WT": 0.5}, {"case_id": "b", "WT": float("nan")}])
    assert path.read_bytes() == b"case_id,WT\r\na,0.5\r\nb,nan\r\n"
    assert list(csv.DictReader(path.open())) == [{"case_id": "a", "WT": "0.5"}, {"case_id": "b", "WT": "nan"}]


def test_the_prefetcher_moves_every_batch_in_order():
    from unet_trainer.training.prefetch import DevicePrefetcher
    from unet_trainer.training.trainer import DevicePrefetcher as used_by_the_loop

    assert used_by_the_loop is DevicePrefetcher
    batches = [(torch.full((1, 2), float(i)), torch.full((1,), i)) for i in range(3)]
    got = list(DevicePrefetcher(iter(batches), torch.device("cpu")))
    assert [int(label) for _, label in got] == [0, 1, 2]


def test_settings_annotations_are_the_schemas():
    from unet_trainer.core import schema
    from unet_trainer.models import unet
    from unet_trainer.training import losses

    # One definition: the components annotate with the schema's own bounds, and it derives fields from them.
    assert unet.PositiveInt is schema.PositiveInt and losses.NonNegative is schema.NonNegative
    field = schema.field_from_hint(schema.PositiveInt, 3, "x")
    assert field.minimum == 1 and field.kind == "int"


def test_the_label_names_are_the_metrics_and_the_pictures():
    import torch

    from unet_trainer.data import schemes as labels
    from unet_trainer.evaluation import metrics, visualize

    # One definition: the scores and the pictures name the classes as the label scheme does.
    for scheme in labels.SCHEMES.values():
        empty = torch.zeros(2, 2, 2, dtype=torch.uint8)
        assert list(metrics.case_dice(empty, empty, scheme=scheme))[: len(scheme.classes)] == list(scheme.classes)
        assert [text.split()[0] for text in visualize.label_legend(scheme).values()] == list(scheme.classes)
    assert labels.LABEL_NAMES == {1: "NCR", 2: "ED", 3: "EN"}


def test_the_dispatcher_knows_the_installed_console_scripts():
    scripts = importlib.metadata.distribution(dispatch.DISTRIBUTION).entry_points.select(group="console_scripts")
    expected = {ep.name.removeprefix("unet-"): ep.value for ep in scripts if ep.name.startswith("unet-")}
    assert {name: ep.value for name, ep in dispatch.commands().items()} == expected
    assert set(expected) == {"train", "data", "eval", "predict", "cv", "export"}


def test_a_command_is_run_with_the_rest_of_the_line(monkeypatch):
    seen = []
    entry = importlib.metadata.EntryPoint("unet-fake", "builtins:len", "console_scripts")
    monkeypatch.setattr(dispatch, "commands", lambda: {"fake": entry})
    monkeypatch.setattr(entry.__class__, "load", lambda self: lambda argv: seen.append(argv) or 7)
    assert dispatch.main(["fake", "a", "--b"]) == 7
    assert seen == [["a", "--b"]]


def test_the_usage_lists_known_commands_first_and_new_ones_after():
    assert dispatch.usage_names({"cv", "train", "zeta", "eval", "alpha"}) == ["train", "eval", "cv", "alpha", "zeta"]


def test_without_the_distributions_metadata_one_line_says_to_install_and_exits_2(monkeypatch, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dispatch, "distribution", missing)
    for argv in (["train", "configs/demo.yaml"], []):
        assert dispatch.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "install" in err and "unet-trainer" in err
