"""``unet-predict CHECKPOINT [CHECKPOINT...] INPUT OUTPUT [OVERRIDES...] ...``: segment a dataset."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config.config import ConfigError
from ..core.checkpoint import CheckpointError
from ..core.runfolder import RunFolderError
from ..data.layouts import CONVENTION_SCHEME, DLE_LABEL_CONVENTIONS, LAYOUTS, DataFormatError, native_of_class
from ..data.schemes import SCHEMES
from .errors import FAILURE, USAGE_ERROR, ErrorTable, command, guard
from .parsing import (
    FORMAT_LIST,
    command_arguments,
    command_parser,
    format_flag,
    parse_command_line,
    postprocessing_flags,
)


def label_numbering_text(indent: str = "    ") -> str:
    """Each label numbering the layouts' files use, one line each with the layouts that use it, from
    the layout registry: "    brats2021: NCR 1, ED 2, EN 4" ... "    brats-men-rt: GTV 1"."""
    groups: dict[str, list[str]] = {}
    for name, layout in LAYOUTS.items():
        conventions = dict.fromkeys(
            [layout.label_convention, *layout.scheme_conventions(DLE_LABEL_CONVENTIONS[0]).values()]
        )
        for convention in conventions:
            names = SCHEMES[CONVENTION_SCHEME[convention]].label_names
            native_of = native_of_class(convention)
            numbering = ", ".join(f"{names[c]} {native_of[c]}" for c in sorted(names))
            listed = groups.setdefault(numbering, [])
            if not any(entry.split(" ")[0] == name for entry in listed):  # a layout once per numbering
                listed.append(name if convention == layout.label_convention else f"{name} ({convention})")
    return "\n".join(f"{indent}{', '.join(layouts)}: {numbering}" for numbering, layouts in groups.items())


USAGE = f"""usage: unet-predict CHECKPOINT [CHECKPOINT...] INPUT OUTPUT [OVERRIDES...] [--format FMT]
                    [--probabilities] [--overlays] [--postprocessing FILE | --no-postprocessing] [--no-progress]
                    [--cpu-path auto|fp32|bf16]
       unet-predict EXPORTED_DIR INPUT OUTPUT [device=cpu|cuda] [--runtime onnx|torchscript] [...]

Segment every case of INPUT (raw cases in any supported layout, labels not needed) with a
checkpoint of unet-train and write OUTPUT/<case>.nii.gz: uint8 labels with the case's original
shape and affine, in the input's own label numbering (DLE arrays: the one data.dle_labels names):
{label_numbering_text()}
A case that cannot be read or does not fit the model is reported in one line and skipped; the
exit status is then 1.

  CHECKPOINT         a checkpoint file, or a unet-cv folder (each fold's best-rank0.pt, else its
                     newest checkpoint) or a run folder; several (every argument without '=' but
                     the last two) make an ensemble: their softmax (sigmoid in region mode)
                     probabilities are averaged, one pass per model over each volume. Their
                     outputs and inputs must agree (loss region mode, model.num_classes,
                     data.dle_labels, model.in_channels, data.target_spacing); architectures may differ
  EXPORTED_DIR       a folder of unet-export: its graphs run (onnxruntime, torch.jit) with the
                     windows, preprocessing and postprocessing its model.json records
  OVERRIDES          config overrides (every model's), e.g. eval.mirror_tta=true eval.overlap=0.5 device=cpu precision=fp32
  --format FMT       layout of INPUT: {FORMAT_LIST}
  --probabilities    also write OUTPUT/<case>_probabilities.nii.gz (float32, x, y, z, class)
  --overlays         also write OUTPUT/<case>_overlay.png: the prediction's contours on three
                     FLAIR slices through the tumour, region volumes in the title
  --postprocessing FILE
                     postprocess the labels with this postprocessing.json (default: the one
                     unet-eval --choose-postprocessing wrote into the checkpoint's run folder,
                     or the one in a given run or unet-cv folder, when there is one, or the
                     rules an EXPORTED_DIR records; none by default for several checkpoints)
  --no-postprocessing
                     write the model's labels as they are
  --runtime FMT      the format of EXPORTED_DIR to run: onnx (on the CPU) or torchscript (default:
                     the first it holds, in that order)
  --cpu-path PATH     how checkpoints run on the CPU: auto (default: bf16 autocast + channels-last where the
                     CPU has amx_bf16 or avx512_bf16 and the first volume's centred window agrees with
                     fp32, Dice >= 0.995 per region; else fp32 + channels-last), fp32 (exactly fp32, as
                     does precision=fp32) or bf16; one line says which was taken and why
  --no-progress      no progress bar
  -h, --help         show this help
"""


# A prediction that failed as a whole; its OSErrors (e.g. OUTPUT is a file) name the file written or
# read, else OUTPUT.
ERRORS = ErrorTable(
    rows=(((ConfigError,), USAGE_ERROR), ((DataFormatError, CheckpointError, RunFolderError, ValueError), FAILURE))
)


def make_parser():
    parser = command_parser("unet-predict")
    for flag in ("--format", "--postprocessing", "--runtime", "--cpu-path"):
        parser.add_argument(flag)
    for flag in ("--probabilities", "--overlays", "--no-progress", "--no-postprocessing"):
        parser.add_argument(flag, action="store_true")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    """``unet-predict CHECKPOINT [CHECKPOINT...] INPUT OUTPUT [OVERRIDES...] [--format FMT] [--probabilities]``;
    returns the exit status."""
    args = command_arguments(argv, USAGE)
    with guard(ERRORS):
        positionals, flags, overrides = parse_command_line(make_parser(), args, 3, more_positionals=True)
    *checkpoints, source, output = positionals
    with guard(ERRORS, Path(output)):
        fmt = format_flag(flags)
        postprocess = postprocessing_flags(checkpoints, flags)
        from ..commands.predict import predict_dataset

        summary = predict_dataset(
            [Path(c) for c in checkpoints],
            Path(source),
            Path(output),
            fmt,
            overrides,
            probabilities=flags["--probabilities"],
            progress=not flags["--no-progress"],
            overlays=flags["--overlays"],
            postprocess=postprocess,
            runtime=flags["--runtime"],
            cpu_path=flags["--cpu-path"],
        )
    files = sum(len(paths) for paths in summary.written.values())
    line = f"Wrote {len(summary.written)} segmentation(s) ({files} files) to {output}"
    if summary.failed:
        print(f"{line}; {len(summary.failed)} case(s) failed: {', '.join(sorted(summary.failed))}", file=sys.stderr)
        return FAILURE
    print(line)
    return 0
