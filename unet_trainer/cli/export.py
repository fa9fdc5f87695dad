"""``unet-export CHECKPOINT [CHECKPOINT...] OUT_DIR --format onnx,torchscript [OVERRIDES...]``: a model for other
tools."""

from __future__ import annotations

from pathlib import Path

from ..config.config import ConfigError
from ..core.checkpoint import CheckpointError
from ..evaluation.postprocessing import PostprocessingError
from .errors import FAILURE, USAGE_ERROR, ErrorTable, command, guard
from .parsing import command_arguments, command_parser, parse_command_line, postprocessing_flags

# The formats, in the order of export.EXPORT_FILES, without importing the commands for the usage text.
FORMATS = ("onnx", "torchscript", "monai-bundle")

USAGE = f"""usage: unet-export CHECKPOINT [CHECKPOINT...] OUT_DIR --format FMT[,FMT...] [OVERRIDES...]
                   [--postprocessing FILE | --no-postprocessing]

Write OUT_DIR, a folder that needs nothing of unet-trainer to be used: per model a graph file
per format (model.onnx, model.ts) that maps a batch of patches (N, C, *patch) float32, N free,
to the full-resolution logits (deep-supervision heads dropped), and model.json: the input
channels, what the outputs mean and how they become labels (canonical and native numberings),
the preprocessing, the sliding-window settings, the postprocessing rules, and the version,
checkpoints and run ids that made it. Each graph is read back and checked against torch on
random and phantom patches before OUT_DIR appears (ONNX through onnxruntime within 1e-4,
TorchScript within 1e-5); OUT_DIR appears complete or not at all. unet-predict OUT_DIR INPUT
OUTPUT predicts with it as with the checkpoint.

  CHECKPOINT         a checkpoint file, or a unet-cv or run folder; several make an ensemble
                     (every model is exported; unet-predict averages their probabilities)
  OUT_DIR            a new folder (or an empty one)
  --format FMT       {", ".join(FORMATS)}; several separated by commas (ONNX needs
                     pip install 'unet-trainer[export]')
  OVERRIDES          config overrides recorded in model.json, e.g. eval.mirror_tta=true eval.overlap=0.5
  --postprocessing FILE
                     record these postprocessing rules (default: the checkpoint's or folder's
                     postprocessing.json, as unet-predict would apply it)
  --no-postprocessing
                     record none
  -h, --help         show this help
"""

ERRORS = ErrorTable(rows=(((ConfigError, PostprocessingError), USAGE_ERROR), ((CheckpointError, ValueError), FAILURE)))


def make_parser():
    parser = command_parser("unet-export")
    for flag in ("--format", "--postprocessing"):
        parser.add_argument(flag)
    parser.add_argument("--no-postprocessing", action="store_true")
    return parser


def export_formats(value: str | None) -> list[str]:
    """``--format onnx,torchscript`` -> ["onnx", "torchscript"] (each once, in the order given).

    Raises:
        ConfigError: no --format, or a name that is not a format.
    """
    if not value:
        raise ConfigError(f"command line: --format is required ({', '.join(FORMATS)}; several separated by commas)")
    formats = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"command line: --format {value!r}: expected {', '.join(FORMATS)}, separated by commas")
    return formats


@command
def main(argv: list[str] | None = None) -> int:
    """``unet-export CHECKPOINT [CHECKPOINT...] OUT_DIR --format FMT[,FMT...]``; returns the exit status."""
    args = command_arguments(argv, USAGE)
    with guard(ERRORS):
        positionals, flags, overrides = parse_command_line(make_parser(), args, 2, more_positionals=True)
        formats = export_formats(flags["--format"])
    *checkpoints, out_dir = positionals
    with guard(ERRORS, Path(out_dir)):
        postprocess = postprocessing_flags(checkpoints, flags)
        from ..commands.export import export_models

        document = export_models([Path(c) for c in checkpoints], Path(out_dir), formats, overrides, postprocess)
    checks = ", ".join(
        f"{fmt} {max(m['max_difference_to_torch'][fmt] for m in document['models']):.1g}" for fmt in formats
    )
    print(f"Exported {len(document['models'])} model(s) to {out_dir}; largest logit difference from torch: {checks}")
    return 0
