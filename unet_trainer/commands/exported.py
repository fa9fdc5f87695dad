"""An exported model folder (``unet-export``), read back for inference: what ``unet-predict EXPORTED_DIR``
runs, and what ``unet-export`` checks each written graph with.

A folder holds ``model.json`` (:data:`MODEL_JSON`: what the inputs, outputs, preprocessing, windows and
postprocessing are; see :mod:`export`) and, per model (one, or one per fold of an ensemble), a graph file per
format (:data:`GRAPH_FILES`): ONNX run by ``onnxruntime``, TorchScript by ``torch.jit``. Each graph maps a
batch of patches (N, C, *patch) float32 to logits (N, K, *output) float32, N free.

:class:`ExportedModel` offers what :func:`predict.predict_case` uses of a ``LoadedModel``
(``probabilities``, ``in_channels``, ``region_mode``, ``device``, ``prepare_settings``...), so an
exported folder's labels take the checkpoint's path through the same :class:`SlidingWindow` (windows,
Gaussian weighting, mirroring), the same probabilities and the same NIfTI writing. It needs nothing of
the training code: only this folder's files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.engine import ConfigError
from ..core.checkpoint import CheckpointError, one_line
from ..core.documents import DocumentError, load_json_text, read_utf8
from ..core.fileio import os_error_line
from ..data.layouts import DataFormatError, scheme_named
from ..data.prepare import PrepareSettings
from ..data.schemes import DEFAULT_SCHEME, LabelScheme
from ..evaluation.evaluation import logits_to_probabilities
from ..evaluation.inference import SlidingWindow
from ..evaluation.postprocessing import Postprocessing, postprocessing_from_rules

MODEL_JSON = "model.json"
FILE_FORMAT = "unet-trainer export"
FILE_VERSION = 1
#: The graph file of each export format, in the order ``unet-predict`` prefers them.
GRAPH_FILES: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.ts"}
#: What installs each format's libraries (named in the one-line error when they are missing).
EXPORT_EXTRA = "pip install 'unet-trainer[export]'"
FORMAT_MODULES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "torchscript": (),
    "monai-bundle": (),  # MONAI is a dependency; its runner's fire comes with the extra
}


class ExportError(CheckpointError):
    """An export that cannot be written, checked or read back: one line naming the format or file and why."""


def missing_modules(fmt: str) -> list[str]:
    """The Python modules ``fmt`` needs that do not import here."""
    import importlib

    missing = []
    for name in FORMAT_MODULES[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_format(fmt: str) -> None:
    """Raises:
    ExportError: ``fmt``'s libraries are not installed (naming them and :data:`EXPORT_EXTRA`)."""
    missing = missing_modules(fmt)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ExportError(f"{fmt}: needs {', '.join(missing)}, which {verb} not installed; run {EXPORT_EXTRA}")


# A graph: (N, C, *window) float32 -> (N, K, *output) float32, on the batch's device.
Graph = Callable[[torch.Tensor], torch.Tensor]


def onnx_graph(path: Path) -> Graph:
    """An ONNX file run by onnxruntime on the CPU, as a function of torch tensors.

    Raises:
        ExportError: onnxruntime missing, or a file it cannot load.
    """
    require_format("onnx")
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnx: {path}: onnxruntime cannot load it ({one_line(str(exc))})") from None
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run(None, {name: array})[0]).to(batch.device)

    return run


def torchscript_graph(path: Path, device: torch.device) -> Graph:
    """A TorchScript file on ``device``, as a function of torch tensors.

    Raises:
        ExportError: a file torch.jit cannot load.
    """
    try:
        with warnings.catch_warnings():
            # torch marks torch.jit deprecated in favour of torch.export, whose files no other tool loads yet.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"torchscript: {path}: torch.jit cannot load it ({one_line(str(exc))})") from None

    def run(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.to(device, torch.float32)).to(batch.device)

    return run


def load_graph(fmt: str, path: Path, device: torch.device) -> Graph:
    """The graph file ``path`` of format ``fmt`` (a key of :data:`GRAPH_FILES`) as a function."""
    return onnx_graph(path) if fmt == "onnx" else torchscript_graph(path, device)


class WindowNet:
    """A graph as :class:`SlidingWindow` calls a model: called on window batches, and saying its output
    size when it is the smaller centred output of unpadded ("valid") convolutions."""

    def __init__(self, graph: Graph, window: tuple[int, ...], output_window: tuple[int, ...]):
        self.graph, self.window, self.output_window = graph, tuple(window), tuple(output_window)
        self.padding = "valid" if self.output_window != self.window else "same"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.graph(batch)

    def output_size(self, window: tuple[int, ...]) -> tuple[int, ...]:
        """The output of the exported window; the graph takes no other window (ValueError)."""
        if tuple(window) != self.window:
            raise ValueError(f"the exported graph takes windows of {list(self.window)}, not {list(window)}")
        return self.output_window


@dataclass
class ExportedMember:
    """One exported model: its graph and its sliding window (model.json's ``models`` entry)."""

    net: WindowNet
    sliding_window: SlidingWindow
    source: str


@dataclass
class ExportedModel:
    """An exported folder's model(s), predicting as a checkpoint's ``LoadedModel`` does.

    Attributes:
        folder: the exported folder; document: its model.json; fmt: the format run;
        members: one per exported model (several: their probabilities are averaged, as an ensemble's);
        device: where the volumes and probabilities live (ONNX graphs run on the CPU).
    """

    folder: Path
    document: dict
    fmt: str
    members: list[ExportedMember]
    device: torch.device

    @property
    def checkpoint(self) -> Path:
        """The folder (what messages about the model name)."""
        return self.folder

    @property
    def checkpoints(self) -> list[Path]:
        """No checkpoint file is read."""
        return []

    @property
    def region_mode(self) -> bool:
        return self.document["output"]["mode"] == "regions"

    @property
    def in_channels(self) -> int:
        return len(self.document["input"]["channels"])

    @property
    def scheme(self) -> LabelScheme:
        """The label scheme model.json records."""
        return exported_scheme(self.document)

    @property
    def num_outputs(self) -> int:
        return len(self.document["output"]["names"])

    @property
    def prepare_settings(self) -> PrepareSettings:
        """How a case is prepared for it, as its training data was (model.json's ``preprocessing``)."""
        prep = self.document["preprocessing"]
        spacing = prep["target_spacing_mm"]
        return PrepareSettings(tuple(spacing) if spacing else None, prep["dle_labels"])

    @property
    def timestamp(self) -> dict:
        """The progress of the only model's checkpoint (epoch), none for several."""
        models = self.document["models"]
        return {"epoch": models[0]["epoch"]} if len(models) == 1 and models[0].get("epoch") is not None else {}

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """The members' mean probabilities of a prepared volume.

        Args:
            image: float32 (C, Z, Y, X).

        Returns:
            float32 (K, Z, Y, X) on ``device``: softmax classes, or sigmoid regions, averaged over members.
        """
        image = image.to(self.device)
        total = None
        for member in self.members:
            probs = logits_to_probabilities(member.sliding_window(member.net, image), self.region_mode)
            total = probs if total is None else total.add_(probs)
        return total.div_(len(self.members))


def is_exported_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a :data:`MODEL_JSON`."""
    return Path(path).is_dir() and (Path(path) / MODEL_JSON).is_file()


def read_model_json(folder: Path) -> dict:
    """The checked model.json of an exported folder.

    Raises:
        ExportError: unreadable, not JSON, not an export's, or another version (one line naming the file).
    """
    path = Path(folder) / MODEL_JSON
    try:
        document = load_json_text(read_utf8(path))
    except OSError as exc:
        raise ExportError(os_error_line(exc, path)) from None
    except (DocumentError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not readable JSON ({one_line(str(exc))})") from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise ExportError(f'{path}: not an exported model (expected "format": "{FILE_FORMAT}", as unet-export writes)')
    if document.get("version") != FILE_VERSION:
        raise ExportError(f"{path}: version {document.get('version')!r} is not supported (expected {FILE_VERSION})")
    return document


def _member(folder: Path, entry: dict, fmt: str, num_outputs: int, device: torch.device) -> ExportedMember:
    path = folder / entry["files"][fmt]
    if not path.is_file():
        raise ExportError(f"{fmt}: {path} is missing; the exported folder is incomplete")
    window = entry["sliding_window"]
    patch = tuple(window["patch_size"])
    net = WindowNet(load_graph(fmt, path, device), tuple(window["window"]), tuple(window["output_window"]))
    sliding = SlidingWindow(
        patch_size=patch,
        spatial_dims=window["spatial_dims"],
        num_outputs=num_outputs,
        overlap=window["overlap"],
        batch_size=window["batch_size"],
        gaussian=window["gaussian"],
        mirror=window["mirror"],
        amp_dtype=None,  # the graphs are exported and checked in float32
    )
    return ExportedMember(net, sliding, entry["checkpoint"])


def load_exported(folder: Path, fmt: str | None = None, device: str = "cpu") -> ExportedModel:
    """Read an exported folder for prediction.

    Args:
        folder: written by ``unet-export``.
        fmt: the format to run (a key of :data:`GRAPH_FILES`); None: the first the folder holds, in that order.
        device: where TorchScript graphs run and volumes live ("cpu" or "cuda"); ONNX graphs run on the CPU.

    Raises:
        ExportError: a bad model.json, a format the folder does not hold or whose libraries are missing,
            or a graph file missing or unloadable.
    """
    folder = Path(folder).expanduser()
    document = read_model_json(folder)
    held = [f for f in GRAPH_FILES if f in document["formats"]]
    if fmt is None:
        fmt = held[0] if held else "onnx"
    if fmt not in held:
        raise ExportError(f"{folder}: holds no {fmt} export (it holds {', '.join(held) or 'none'})")
    torch_device = torch.device("cpu" if fmt == "onnx" else device)
    outputs = len(document["output"]["names"])
    members = [_member(folder, entry, fmt, outputs, torch_device) for entry in document["models"]]
    return ExportedModel(folder, document, fmt, members, torch_device)


def exported_postprocessing(folder: Path) -> Postprocessing | None:
    """The postprocessing rules model.json records (None when it records none).

    Raises:
        ExportError: a bad model.json. PostprocessingError: rules that do not check.
    """
    document = read_model_json(folder)
    section = document.get("postprocessing")
    if section is None:
        return None
    path = Path(folder) / MODEL_JSON
    if not isinstance(section, dict):
        raise ExportError(f'{path}: "postprocessing" must be an object or null')
    return postprocessing_from_rules(
        path, section.get("kept"), str(section.get("source", "")), exported_scheme(document)
    )


def exported_scheme(document: dict) -> LabelScheme:
    """The label scheme a model.json records (a folder exported before schemes were recorded: the
    default scheme, the BraTS glioma classes)."""
    labels = document.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    name, definition = labels.get("scheme", DEFAULT_SCHEME), labels.get("scheme_definition")
    if not isinstance(name, str) or not isinstance(definition, (str, type(None))):
        raise ExportError(f"{MODEL_JSON}: labels.scheme must be a name, labels.scheme_definition text or null")
    try:
        return scheme_named(name, definition)
    except DataFormatError:
        raise ExportError(f"{MODEL_JSON}: unknown label scheme {json.dumps(name)[:40]}") from None


#: The one setting ``unet-predict`` takes for an exported folder; the others are model.json's.
EXPORTED_DEVICES = ("cpu", "cuda", "auto")


def exported_device(overrides: list[str]) -> str:
    """The device an exported folder predicts on, from the command line's ``device=...`` (default auto:
    CUDA when available).

    Raises:
        ConfigError: any other override (the folder's settings are its model.json's), or an unknown device.
    """
    device, rest = "auto", list(overrides)
    while rest:  # key=value, or --key value (as the command line's parser hands them)
        key, value = rest.pop(0).split("=", 1) if "=" in rest[0] else (rest.pop(0), rest.pop(0) if rest else "")
        if key.lstrip("-") != "device":
            raise ConfigError(
                f"command line: {key} does not apply to an exported folder; its settings are in its {MODEL_JSON} "
                "(export again with the override), only device=cpu|cuda is taken"
            )
        device = value
    if device not in EXPORTED_DEVICES:
        raise ConfigError(f"command line: device {device!r} is not one of {', '.join(EXPORTED_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("command line: device=cuda but no GPU is available")
    return "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
