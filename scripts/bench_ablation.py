#!/usr/bin/env python
"""Which speed switches of a run config pay: scripts/bench_train.py run once per variant.

Ours runs with every speed switch of the resolved config on (the reference), without each in turn,
without any, and with each ``--candidate`` override added, each run a separate process of
scripts/bench_train.py; the MONAI-built pipeline runs once as the peer. A switch is kept when
turning it off costs at least ``--min-gain`` and more than the run-to-run spread (``--repeats``).
It takes every option of bench_train.py (the setting) plus its own; the method and the recorded
verdicts are in BENCHMARKS.md (the bench_train section).

Examples:
    python scripts/bench_ablation.py --recipe fast                       # CUDA: the full setting
    python scripts/bench_ablation.py --recipe fast --candidate algorithms.compile.mode=reduce-overhead
    python scripts/bench_ablation.py --device cpu --recipe fast --repeats 3 --eval-repeats 3
    python scripts/bench_ablation.py --recipe fast --json a.json --resume   # goes on where a.json stopped
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

from bench_train import (  # noqa: E402
    RecipePlan,
    SetupError,
    add_setting_arguments,
    finish_setting,
    print_report,
    set_up,
    setting_of,
    write_json,
)
from benchutil import Measurement, device_description  # noqa: E402

BENCH_TRAIN = SCRIPTS / "bench_train.py"


# Algorithms that change what is learned, not only how fast: never ablated as speed switches.
NOT_SPEED_SWITCHES = ("ema",)


@dataclass(frozen=True)
class Variant:
    """One ablation run of ours: a label, the overrides it adds after the user's, and the switch
    it turns off (None for the all / none / candidate runs)."""

    label: str
    overrides: tuple[str, ...]
    switch: str | None = None


def speed_switches(cfg: dict) -> list[tuple[str, str]]:
    """(name, the override that turns it off) for each speed switch on in the resolved ``cfg``:
    its algorithms except those that change the result (EMA), then the prefetch to the device."""
    switches = [(name, f"algorithms.{name}=null") for name in cfg["algorithms"] if name not in NOT_SPEED_SWITCHES]
    if cfg["data"]["prefetch_to_device"]:
        switches.append(("data.prefetch_to_device", "data.prefetch_to_device=false"))
    return switches


def ablation_variants(cfg: dict, candidates: list[str]) -> list[Variant]:
    """All switches on (the reference), each switch off in turn, all off (when there are two or
    more), then each candidate override added to the reference."""
    switches = speed_switches(cfg)
    variants = [Variant("all switches", ())]
    variants += [Variant(f"without {name}", (off,), name) for name, off in switches]
    if len(switches) > 1:
        variants.append(Variant("no switches", tuple(off for _, off in switches)))
    variants += [Variant(f"with {candidate}", (candidate,)) for candidate in candidates]
    return variants


def switch_verdict(gain: float, min_gain: float, noise: float | None) -> str:
    """Keep a switch only when turning it off costs at least ``min_gain`` (a fraction) of the rate and
    more than the run-to-run ``noise`` (a fraction; None with one repeat, when it is unknown)."""
    threshold = max(min_gain, noise or 0.0)
    if gain >= 1.0 + threshold:
        return "keep"
    if gain <= 1.0 - threshold:
        return f"drop: it costs {100 * (1.0 - gain):.0f}%"
    return f"drop: no measurable gain (within {100 * threshold:.0f}%)"


@dataclass
class Repeats:
    """One variant's runs (None for a failed run) and its summary across them."""

    runs: list[Measurement | None] = field(default_factory=list)

    @property
    def measured(self) -> list[Measurement]:
        return [m for m in self.runs if m is not None]

    @property
    def rate(self) -> float:
        """Median over the runs of each run's median samples/s."""
        return statistics.median(m.median_rate for m in self.measured)

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the runs' rates: the run-to-run noise; None with fewer than 2 runs."""
        rates = [m.median_rate for m in self.measured]
        return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else None

    @property
    def representative(self) -> Measurement | None:
        """The run with the median rate (the lower middle one for an even count)."""
        ranked = sorted(self.measured, key=lambda m: m.median_rate)
        return ranked[(len(ranked) - 1) // 2] if ranked else None


def pair_noise(a: Repeats, b: Repeats) -> float | None:
    """The larger spread of two variants, or None when either ran once."""
    spreads = [a.spread, b.spread]
    return None if None in spreads else max(spreads)


def child_command(
    args: argparse.Namespace,
    extra_overrides: tuple[str, ...],
    only: str,
    json_path: Path,
    microbatch: int | str | None = None,
    skip_eval: bool = False,
) -> list[str]:
    """The command line of one ablation run: bench_train.py with the parent's settings as resolved,
    one pipeline, the extra overrides last."""
    command = [
        sys.executable,
        str(BENCH_TRAIN),
        "--device",
        args.device,
        "--config",
        args.config,
        "--work",
        str(args.work),
        "--cases",
        str(args.cases),
        "--shape",
        *map(str, args.shape),
        "--seed",
        str(args.seed),
        "--epoch-cases",
        str(args.epoch_cases),
        "--patch",
        str(args.patch),
        "--depth",
        str(args.depth),
        "--width-divisor",
        str(args.width_divisor),
        "--batch",
        str(args.batch),
        "--precision",
        args.precision,
        "--prepare-workers",
        str(args.prepare_workers),
        "--warmup-epochs",
        str(args.warmup_epochs),
        "--timed-epochs",
        str(args.timed_epochs),
        "--eval-repeats",
        str(args.eval_repeats),
        "--eval-crop",
        *map(str, args.eval_crop),
        "--monai-dataset",
        args.monai_dataset,
        "--recipe-train-cases",
        str(args.recipe_train_cases),
        "--recipe-val-cases",
        str(args.recipe_val_cases),
        "--only",
        only,
        "--json",
        str(json_path),
    ]
    microbatch = microbatch if microbatch is not None else args.microbatch
    if microbatch != "null":  # "null" (the whole batch) is what the child resolves to when none is given
        command += ["--microbatch", str(microbatch)]
    if args.recipe:
        command += ["--recipe", args.recipe]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.cudnn_benchmark:
        command.append("--cudnn-benchmark")
    if skip_eval or args.skip_eval:
        command.append("--skip-eval")
    for override in [*args.override, *extra_overrides]:
        command += ["--override", override]
    return command


def run_child(command: list[str], log: Path) -> tuple[dict | None, float]:
    """Run one ablation run in its own process (fresh CUDA context, compile caches, cuDNN flags and
    memory statistics), its report into ``log``; returns (its JSON or None on failure, wall seconds)."""
    json_path = Path(command[command.index("--json") + 1])
    json_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(shlex.join(command) + "\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - started
    if code != 0 or not json_path.is_file():
        lines = log.read_text().splitlines()
        print(f"  FAILED (exit {code}); the last lines of {log}:", file=sys.stderr)
        for line in lines[-15:]:
            print(f"    {line}", file=sys.stderr)
        return None, wall
    return json.loads(json_path.read_text()), wall


def run_ablation(
    args: argparse.Namespace, cfg: dict, overrides: list[str], plan: RecipePlan, measurable: str | None
) -> int:
    """Run every variant of ours ``--repeats`` times, interleaved so that a drift of the machine
    touches all of them alike, each run in its own process; then the MONAI reference once. Prints
    the usual report for the median all-switches run, then what each switch gains."""
    variants = ablation_variants(cfg, args.candidate)
    folder = args.work / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    results = {variant.label: Repeats() for variant in variants}
    walls: dict[str, list[float]] = {variant.label: [] for variant in variants}
    total = args.repeats * len(variants)
    monai = None
    if args.resume and args.json and args.json.is_file():
        runs, earlier_walls, monai = earlier_runs(args.json, args, cfg, variants)
        for label, measured in runs.items():
            # Failed runs are tried again; measured ones are kept.
            kept = [(m, w) for m, w in zip(measured, earlier_walls[label]) if m is not None][: args.repeats]
            results[label].runs = [m for m, _ in kept]
            walls[label] = [w for _, w in kept]
        done = sum(len(r.runs) for r in results.values())
        print(
            f"[ablation] --resume: {done} run(s) taken from {args.json}"
            f"{' and the MONAI reference' if monai is not None else ''}",
            file=sys.stderr,
        )

    def save() -> None:
        # After every run, so a command stopped at a time limit still leaves what it measured.
        if args.json:
            write_json(
                args.json,
                args,
                cfg,
                {f"{v.label} #{r}": m for v in variants for r, m in enumerate(results[v.label].runs)},
                monai,
                {
                    "variants": [
                        {"label": v.label, "overrides": list(v.overrides), "switch": v.switch, "wall_s": walls[v.label]}
                        for v in variants
                    ]
                },
            )

    for repeat in range(args.repeats):
        for index, variant in enumerate(variants):
            if len(results[variant.label].runs) > repeat:
                continue  # measured by an earlier, resumed command
            number = repeat * len(variants) + index + 1
            print(
                f"[ablation {number}/{total}] ours, {variant.label}"
                f"{' (' + ', '.join(variant.overrides) + ')' if variant.overrides else ''}",
                file=sys.stderr,
            )
            stem = f"{index}-r{repeat}"
            # Evaluation is timed for the reference only: the projection needs it once, and a
            # compiled variant would compile its eval graph for nothing.
            data, wall = run_child(
                child_command(args, variant.overrides, "ours", folder / f"{stem}.json", skip_eval=index > 0),
                folder / f"{stem}.log",
            )
            results[variant.label].runs.append(Measurement.from_json(data["ours"]) if data else None)
            walls[variant.label].append(wall)
            save()
    reference = results[variants[0].label].representative
    if args.only != "ours" and monai is None:
        microbatch = args.microbatch
        if microbatch == "auto" and reference is not None:
            microbatch = reference.microbatch  # MONAI trains at the microbatch ours settled on, as in bench_train.py
        print(f"[ablation] MONAI reference (microbatch {microbatch})", file=sys.stderr)
        data, wall = run_child(
            child_command(args, (), "monai", folder / "monai.json", microbatch), folder / "monai.log"
        )
        monai = Measurement.from_json(data["monai"]) if data else None
        walls["MONAI reference"] = [wall]
        save()
    if reference is None:
        print("error: every all-switches run failed; see the log above", file=sys.stderr)
        return 1
    print_report(args, cfg, overrides, plan, reference, monai, args.device, measurable)
    print_ablation(variants, results, walls, monai, args, folder)
    return 0


def print_ablation(
    variants: list[Variant],
    results: dict[str, Repeats],
    walls: dict[str, list[float]],
    monai: Measurement | None,
    args: argparse.Namespace,
    folder: Path,
) -> None:
    reference = results[variants[0].label]
    print()
    print(
        f"ablation: {args.repeats} run(s) per variant, interleaved, each in its own process, on the same phantom, "
        f"setting and timing; per-run reports in {folder}"
    )
    print(
        f"{'variant':<52}{'runs':>5}{'samples/s':>11}{'spread':>8}{'data wait':>11}{'peak mem':>10}{'vs all':>9}"
        f"{'run wall':>10}"
    )
    print(f"{'':<52}{'':>5}{'(median)':>11}{'':>8}{'':>11}{'(GiB)':>10}{'':>9}{'(s)':>10}")
    rows = [(v.label, results[v.label]) for v in variants]
    if monai is not None:
        rows.append(("MONAI reference", Repeats([monai])))
    for label, repeats in rows:
        m = repeats.representative
        if m is None:
            print(f"{label:<52}{'failed: see its logs':>41}")
            continue
        peak = f"{m.peak_bytes / 2**30:.2f}" if m.peak_bytes is not None else "n/a"
        spread = f"{100 * repeats.spread:.0f}%" if repeats.spread is not None else "-"
        print(
            f"{label:<52}{len(repeats.measured):>5}{repeats.rate:>11.2f}{spread:>8}{100 * m.wait_fraction:>10.1f}%"
            f"{peak:>10}{repeats.rate / reference.rate:>8.2f}x{statistics.median(walls[label]):>10.0f}"
        )
    print()
    print(
        f"switches (gain = all switches / without it, median samples/s; kept at >= {1 + args.min_gain:.2f}x and "
        "above the spread of the two variants):"
    )
    for variant in variants:
        if variant.switch is None:
            continue
        without = results[variant.label]
        if not without.measured:
            print(f"  {variant.switch:<28} not measured: the runs without it failed")
            continue
        gain = reference.rate / without.rate
        print(
            f"  {variant.switch:<28} {gain:6.2f}x   {switch_verdict(gain, args.min_gain, pair_noise(reference, without))}"
        )
    candidates = [v for v in variants if v.label.startswith("with ")]
    if candidates:
        print("candidates (gain = with it / all switches; adopted on the same rule):")
        for variant in candidates:
            added = results[variant.label]
            if not added.measured:
                print(f"  {variant.overrides[0]:<50} not measured: its runs failed")
                continue
            gain = added.rate / reference.rate
            verdict = switch_verdict(gain, args.min_gain, pair_noise(reference, added))
            print(f"  {variant.overrides[0]:<50} {gain:6.2f}x   {'adopt' if verdict == 'keep' else 'leave out'}")
    if args.repeats == 1:
        print("NOTE: one run per variant: the run-to-run noise is unknown; --repeats 3 measures it.")
    if args.device != "cuda":
        print("NOTE: CPU verdicts. cudnn_benchmark and the prefetch to the device do nothing without CUDA, and")
        print("      CPU kernels rank channels-last and compile differently from a GPU: these verdicts do not")
        print("      decide recipes/fast.yaml, which is for GPUs.")
    print("=" * 100)


def earlier_runs(
    path: Path, args: argparse.Namespace, cfg: dict, variants: list[Variant]
) -> tuple[dict[str, list], dict[str, list[float]], Measurement | None]:
    """The runs an earlier ``--json PATH`` of the same setting on this device measured:
    (label -> runs by repeat, label -> wall seconds, the MONAI reference or None).

    Raises:
        SystemExit: the file was written for another setting or device (names what differs).
    """
    document = json.loads(path.read_text())
    mine = {"device": device_description(args.device), "setting": setting_of(args, cfg)}
    differing = [key for key in mine if document.get(key) != mine[key]]
    if differing:
        raise SystemExit(
            f"error: --resume: {path} was measured with another {' and '.join(differing)}; "
            "remove it or name another --json"
        )
    known = {v["label"]: v for v in document.get("variants", [])}
    runs: dict[str, list] = {}
    walls: dict[str, list[float]] = {}
    for variant in variants:
        entry = known.get(variant.label)
        if entry is None or entry["overrides"] != list(variant.overrides):
            continue
        runs[variant.label] = [
            Measurement.from_json(data) if data else None
            for key, data in document["ours"].items()
            if key.rsplit(" #", 1)[0] == variant.label
        ]
        walls[variant.label] = list(entry["wall_s"])
    monai = Measurement.from_json(document["monai"]) if document.get("monai") else None
    return runs, walls, monai


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_setting_arguments(p)
    p.add_argument(
        "--only", default=None, choices=("ours",), help="ours: leave out the MONAI reference run (default: run it)"
    )
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also measure the all-switches run plus this override (repeatable), "
        "e.g. algorithms.compile.mode=reduce-overhead (CUDA graphs)",
    )
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.03,
        help="the fraction a switch must gain to be kept (default 0.03)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per variant, interleaved; 2 or more measure the run-to-run noise, "
        "which a switch must beat to be kept (default 1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --json: keep the runs that file already holds (an earlier command of "
        "the same setting on this device, stopped at a time limit say) and run only the rest",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.resume and not args.json:
        p.error("--resume needs --json")
    return finish_setting(p, args, args.candidate)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup = set_up(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_ablation(args, setup.cfg, setup.overrides, setup.plan, setup.measurable)


if __name__ == "__main__":
    sys.exit(main())
