"""The networks' structure, which checkpoints depend on: the state_dict keys and shapes of a tiny
U-Net, a residual 2D U-Net and a tiny residual-encoder U-Net against a committed fixture
(tests/fixtures/model_state_keys.json, written from the code as it was before the models were split
into modules), the one decoder builder both nets share, and the imports the models folder allows
itself (blocks and checks are leaves, so the models' import chain stays short)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_architecture import import_graph

from unet_trainer.models.base import EncoderDecoderNet
from unet_trainer.models.blocks import DecoderStage
from unet_trainer.models.resenc import ResidualEncoderUNet
from unet_trainer.models.unet import UNet

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "model_state_keys.json"
NETS = {"UNet": UNet, "ResidualEncoderUNet": ResidualEncoderUNet}


def fixture_entries() -> dict[str, dict]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def build(entry: dict, device: str = "meta") -> EncoderDecoderNet:
    with torch.device(device):
        return NETS[entry["class"]](**entry["arguments"])


@pytest.mark.parametrize("name", sorted(fixture_entries()))
def test_state_dict_keys_and_shapes_match_the_committed_fixture(name: str):
    # Keys, their order and their shapes are what a checkpoint of an earlier version holds; a
    # renamed attribute, a reordered registration or a changed shape would break its resume.
    entry = fixture_entries()[name]
    state = build(entry).state_dict()
    assert [[key, list(value.shape)] for key, value in state.items()] == entry["state"]


def test_the_fixture_covers_both_nets_and_every_part_of_them():
    entries = fixture_entries()
    assert {entry["class"] for entry in entries.values()} == set(NETS)
    keys = [key for entry in entries.values() for key, _ in entry["state"]]
    for part in ("encoder.", "decoder.", "output_head.", "deep_supervision_outputs.", "running_mean"):
        assert any(key.startswith(part) or part in key for key in keys), part


def test_both_nets_build_their_decoder_through_the_one_shared_builder(monkeypatch):
    built: list[tuple[type, torch.nn.Module]] = []
    shared = EncoderDecoderNet._build_decoder

    def recording_build_decoder(self, layers, **kwargs):
        shared(self, layers, **kwargs)
        built.append((type(self), self.decoder))

    monkeypatch.setattr(EncoderDecoderNet, "_build_decoder", recording_build_decoder)
    models = [build(entry) for entry in fixture_entries().values()]
    assert [cls for cls, _ in built] == [type(model) for model in models]
    for model, (_, decoder) in zip(models, built):
        assert model.decoder is decoder
        assert len(model.decoder) == len(model.filters) - 1
        assert all(type(stage) is DecoderStage for stage in model.decoder)
    for cls in NETS.values():
        assert "_build_decoder" not in vars(cls), f"{cls.__name__} builds its own decoder"


def test_the_decoder_stages_differ_only_in_their_arguments():
    # U-Net: two convs per decoder stage; ResEnc: decoder_convs (one by default).
    entries = fixture_entries()
    unet, resenc = build(entries["unet"]), build(entries["resenc"])
    assert [len(stage.block) for stage in unet.decoder] == [2, 2]
    assert [len(stage.block) for stage in resenc.decoder] == [1, 1]
    assert type(unet.decoder[0].upsample) is type(resenc.decoder[0].upsample) is torch.nn.ConvTranspose3d


def test_seeded_initialisation_is_reproducible_and_the_residual_norms_start_at_zero():
    entry = fixture_entries()["resenc"]
    torch.manual_seed(0)
    first = build(entry, "cpu").state_dict()
    torch.manual_seed(0)
    second = build(entry, "cpu").state_dict()
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)
    last_norms = [key for key in first if ".norm2." in key]
    assert last_norms and all(not first[key].any() for key in last_norms)


# What each module of the models folder may import from the package, as models/__init__.py says.
ALLOWED_IMPORTS = {
    "unet_trainer.models.blocks": set(),
    "unet_trainer.models.checks": set(),
    "unet_trainer.models.base": {
        "unet_trainer.core.schema",
        "unet_trainer.models.blocks",
        "unet_trainer.models.checks",
    },
    "unet_trainer.models.unet": {
        "unet_trainer.core.schema",
        "unet_trainer.models.base",
        "unet_trainer.models.blocks",
        "unet_trainer.models.checks",
    },
    "unet_trainer.models.resenc": {
        "unet_trainer.core.schema",
        "unet_trainer.models.base",
        "unet_trainer.models.blocks",
        "unet_trainer.models.checks",
    },
}


def test_the_models_modules_import_only_what_their_folder_docstring_allows():
    graph = import_graph()
    models = {module for module in graph if module.startswith("unet_trainer.models.")}
    assert models == set(ALLOWED_IMPORTS)
    for module, allowed in ALLOWED_IMPORTS.items():
        assert set(graph[module]) <= allowed, (module, sorted(set(graph[module]) - allowed))
