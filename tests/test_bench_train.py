"""The plumbing of scripts/bench_train.py and scripts/bench_ablation.py that decides what is measured:
the recipe projection and the ablation of speed switches. The timings themselves live in the
benchmark, never in tests."""

import sys

import pytest
from conftest import ROOT, script_module

from unet_trainer.config.config import resolve_config


@pytest.fixture(scope="module")
def bench():
    with script_module("bench_train") as module:
        yield module


@pytest.fixture(scope="module")
def ablation():
    with script_module("bench_ablation") as module:
        yield module


def test_recipe_plan_counts_the_composer_recipe(bench):
    cfg = resolve_config(ROOT / "configs" / "brats.yaml")
    plan = bench.recipe_plan(cfg, 387)
    # 200 epochs of 387 cases in batches of 64: 7 steps per epoch (the last of 3 samples).
    assert (plan.samples, plan.steps, plan.epochs) == (200 * 387, 200 * 7, 200)
    interval = int(cfg["eval_interval"].removesuffix("ep"))
    assert plan.evaluations == 200 // interval  # the last epoch is an interval end: no extra evaluation


def test_recipe_plan_adds_the_final_evaluation_off_the_interval(bench):
    cfg = resolve_config(ROOT / "configs" / "brats.yaml", ["max_duration=25ep", "eval_interval=10ep"])
    plan = bench.recipe_plan(cfg, 387)
    assert plan.evaluations == 3  # at 10 and 20 epochs, then at the end (25)
    cfg = resolve_config(ROOT / "configs" / "brats.yaml", ["max_duration=100ba", "eval_interval=0ep"])
    plan = bench.recipe_plan(cfg, 387)
    assert (plan.steps, plan.samples, plan.evaluations) == (100, 14 * 387 + 2 * 64, 1)


def test_speed_switches_of_the_fast_recipe(ablation):
    cfg = resolve_config(ROOT / "configs" / "brats.yaml", ["recipe=fast", "algorithms.ema={}"])
    names = [name for name, _ in ablation.speed_switches(cfg)]
    assert set(names) == set(cfg["algorithms"]) - {"ema"} | {"data.prefetch_to_device"}
    assert "ema" not in names  # it changes the weights: not a speed switch
    off = resolve_config(ROOT / "configs" / "brats.yaml", ["recipe=fast", "data.prefetch_to_device=false"])
    assert "data.prefetch_to_device" not in [name for name, _ in ablation.speed_switches(off)]


def test_each_ablation_variant_resolves_to_its_switches(ablation):
    base = ["recipe=fast"]
    cfg = resolve_config(ROOT / "configs" / "brats.yaml", base)
    candidate = "algorithms.compile.mode=reduce-overhead"
    variants = ablation.ablation_variants(cfg, [candidate])
    switches = [name for name, _ in ablation.speed_switches(cfg)]
    assert [v.label for v in variants] == (
        ["all switches"] + [f"without {s}" for s in switches] + ["no switches", f"with {candidate}"]
    )
    assert [v.switch for v in variants[1:-2]] == switches

    def on(variant) -> set[str]:
        resolved = resolve_config(ROOT / "configs" / "brats.yaml", base + list(variant.overrides))
        return set(resolved["algorithms"]) | (
            {"data.prefetch_to_device"} if resolved["data"]["prefetch_to_device"] else set()
        )

    assert on(variants[0]) == set(switches)
    for variant in variants[1:-2]:
        assert on(variant) == set(switches) - {variant.switch}
    assert on(variants[-2]) == set()
    with_candidate = resolve_config(ROOT / "configs" / "brats.yaml", base + list(variants[-1].overrides))
    assert with_candidate["algorithms"]["compile"]["mode"] == "reduce-overhead"


def test_a_child_run_gets_the_parents_settings(bench, ablation, tmp_path):
    parent = ablation.parse_args(
        [
            "--device",
            "cpu",
            "--recipe",
            "fast",
            "--cases",
            "5",
            "--shape",
            "40",
            "48",
            "56",
            "--patch",
            "16",
            "--depth",
            "3",
            "--workers",
            "2",
            "--timed-epochs",
            "3",
            "--override",
            "seed=7",
            "--cudnn-benchmark",
            "--work",
            str(tmp_path),
        ]
    )
    json_path = tmp_path / "0.json"
    command = ablation.child_command(parent, ("algorithms.compile=null",), "ours", json_path)
    assert command[:2] == [sys.executable, str(ROOT / "scripts" / "bench_train.py")]
    child = bench.parse_args(command[2:])
    assert (child.only, child.json, child.ablate) == ("ours", json_path, False)
    assert child.override == ["seed=7", "algorithms.compile=null"]  # the variant's override after the user's
    # The ablation's own options (bench_ablation.py's, not bench_train.py's) are not the child's settings.
    skip = {"only", "json", "ablate", "override", "candidate", "min_gain", "repeats", "resume"}
    assert {k: v for k, v in vars(child).items() if k not in skip} == {
        k: v for k, v in vars(parent).items() if k not in skip
    }


def test_switch_verdicts(ablation):
    assert ablation.switch_verdict(1.10, 0.03, None) == "keep"
    assert ablation.switch_verdict(1.03, 0.03, None) == "keep"
    assert ablation.switch_verdict(1.01, 0.03, None).startswith("drop: no measurable gain")
    assert ablation.switch_verdict(0.90, 0.03, None) == "drop: it costs 10%"
    # A gain inside the run-to-run noise is no gain.
    assert ablation.switch_verdict(1.10, 0.03, 0.15) == "drop: no measurable gain (within 15%)"
    assert ablation.switch_verdict(1.20, 0.03, 0.15) == "keep"


def test_repeats_summarise_runs_and_their_noise(ablation):
    def run(rate: float):
        return ablation.Measurement("ours", step_s=[1.0, 1.0, 1.0], wait_s=[0.0] * 3, samples=[int(rate)] * 3)

    repeats = ablation.Repeats([run(10), None, run(12), run(11)])  # a failed run counts for nothing
    assert repeats.rate == 11
    assert repeats.spread == pytest.approx(2 / 11)
    assert repeats.representative.median_rate == 11
    single = ablation.Repeats([run(20)])
    assert single.spread is None and ablation.pair_noise(repeats, single) is None
    assert ablation.pair_noise(repeats, ablation.Repeats([run(20), run(21)])) == pytest.approx(2 / 11)
    round_trip = ablation.Measurement.from_json(run(7).to_json())
    assert (round_trip.median_rate, round_trip.samples) == (7, [7, 7, 7])


def test_ablation_options_are_checked(bench, ablation, capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--device", "cpu", "--only", "monai"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--candidate", "algorithms.compile={}"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--repeats", "3"])
    with pytest.raises(SystemExit):
        ablation.parse_args(["--device", "cpu", "--candidate", "max_duration=1ep"])
    assert "set by the benchmark" in capsys.readouterr().err


def test_the_evaluation_box_is_a_centred_brats_brain_box(bench):
    assert bench.centre_crop_box((136, 217, 210), (140, 170, 140)) == (slice(0, 136), slice(23, 193), slice(35, 175))
    full = bench.parse_args(["--device", "cpu", "--shape", "155", "240", "240"])
    assert full.eval_crop == list(bench.BRATS_BRAIN_BOX)
    small = bench.parse_args(["--device", "cpu", "--shape", "62", "96", "48"])
    assert small.eval_crop == [56, 68, 28]  # the brain box scaled with the volume


def test_a_resumed_ablation_keeps_what_the_earlier_command_measured(ablation, tmp_path):
    path = tmp_path / "ablate.json"
    args = ablation.parse_args(["--device", "cpu", "--recipe", "fast", "--resume", "--json", str(path)])
    cfg = resolve_config(ROOT / "configs" / "brats.yaml", ["recipe=fast"])
    variants = ablation.ablation_variants(cfg, [])

    def run(rate: float):
        return ablation.Measurement("ours", step_s=[1.0], wait_s=[0.0], samples=[int(rate)])

    # A command stopped after the reference ran twice (once failing) and the first switch once.
    runs = {f"{variants[0].label} #0": run(30), f"{variants[0].label} #1": None, f"{variants[1].label} #0": run(20)}
    walls = {variants[0].label: [50.0, 3.0], variants[1].label: [40.0]}
    ablation.write_json(
        path,
        args,
        cfg,
        runs,
        None,
        {
            "variants": [
                {"label": v.label, "overrides": list(v.overrides), "switch": v.switch, "wall_s": walls.get(v.label, [])}
                for v in variants
            ]
        },
    )
    earlier, earlier_walls, monai = ablation.earlier_runs(path, args, cfg, variants)
    assert [m and m.median_rate for m in earlier[variants[0].label]] == [30, None]
    assert [m.median_rate for m in earlier[variants[1].label]] == [20]
    assert earlier_walls[variants[0].label] == [50.0, 3.0] and monai is None
    # Another setting must not be mixed in.
    other = ablation.parse_args(
        ["--device", "cpu", "--recipe", "fast", "--resume", "--json", str(path), "--patch", "16"]
    )
    with pytest.raises(SystemExit, match="setting"):
        ablation.earlier_runs(path, other, cfg, variants)
