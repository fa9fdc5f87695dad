"""nnU-Net's residual-encoder U-Net (unet_trainer.models.resenc): the ResEnc M preset's parameter count,
parity with dynamic-network-architectures' ResidualEncoderUNet (when installed), nnU-Net's deep
supervision and initialisation, argument errors, and a few training steps through run_training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from unet_trainer.commands.builders import build_loss
from unet_trainer.commands.train import run_training
from unet_trainer.config.components import build_model
from unet_trainer.config.config import defaults, resolve_config
from unet_trainer.models.base import SegmentationModel, optimize_model
from unet_trainer.models.checks import ModelArgumentError
from unet_trainer.models.resenc import ResidualBlockD, ResidualEncoderUNet

ROOT = Path(__file__).resolve().parent.parent

# ResEnc M for 4 channels and 4 classes, counted once from dynamic-network-architectures 0.4.4's
# ResidualEncoderUNet with the same arguments (conv_bias=False), so CI checks it without the package.
RESENC_M_PARAMETERS = 102_340_116


@pytest.fixture(autouse=True, scope="module")
def single_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(spatial_dims: int = 3, **overrides) -> ResidualEncoderUNet:
    settings = dict(
        spatial_dims=spatial_dims,
        in_channels=2,
        num_classes=3,
        filters=(4, 8, 16, 16),
        kernel_sizes=(3, 3, 3, 3),
        strides=(1, 2, 2, 2),
        blocks_per_stage=(1, 2, 2, 3),
    )
    settings.update(overrides)
    return ResidualEncoderUNet(**settings)


def test_the_shipped_preset_is_resenc_m_with_its_pinned_parameter_count():
    cfg = resolve_config(ROOT / "configs" / "brats-resenc.yaml")
    assert list(cfg["model"]) == ["resenc_unet"]
    with torch.device("meta"):
        model = build_model(cfg["model"])
    assert isinstance(model, ResidualEncoderUNet) and isinstance(model, SegmentationModel)
    assert model.filters == (32, 64, 128, 256, 320, 320) and model.blocks_per_stage == (1, 3, 4, 6, 6, 6)
    assert count(model) == RESENC_M_PARAMETERS
    # The class defaults are the same preset.
    with torch.device("meta"):
        assert count(ResidualEncoderUNet()) == RESENC_M_PARAMETERS
    # One conv per decoder stage, one head per decoder level (5 for 6 stages).
    assert all(len(stage.block) == 1 for stage in model.decoder)
    assert model.deep_supervision_heads == 4 and len(model.deep_supervision_outputs) == 4


# ---------------------------------------------------------------------------------------------
# Against dynamic-network-architectures (nnU-Net's own network code)
# ---------------------------------------------------------------------------------------------


def dna_resenc(spatial_dims, in_channels, num_classes, filters, kernel, strides, blocks, deep_supervision=True):
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
    return unet.ResidualEncoderUNet(
        in_channels,
        len(filters),
        filters,
        conv,
        kernel,
        strides,
        blocks,
        num_classes,
        1,  # n_conv_per_stage_decoder
        conv_bias=False,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )


def copy_dna_weights(dna: nn.Module, ours: ResidualEncoderUNet) -> None:
    """Load DNA's weights into ours, module by module (the encoders list their parameters in the
    same order; DNA's decoder keeps its transposed convs, conv stages and heads in three lists)."""

    def copy(source: nn.Module, target: nn.Module) -> None:
        pairs = list(zip(source.parameters(), target.parameters(), strict=True))
        for a, b in pairs:
            assert a.shape == b.shape
            b.data.copy_(a.data)

    copy(dna.encoder, ours.encoder)
    for j, stage in enumerate(ours.decoder):
        copy(dna.decoder.transpconvs[j], stage.upsample)
        copy(dna.decoder.stages[j], stage.block)
    last = len(ours.filters) - 2  # DNA's seg_layers run deepest first: [last] is full resolution
    copy(dna.decoder.seg_layers[last], ours.output_head)
    for level, head in enumerate(ours.deep_supervision_outputs, start=1):
        copy(dna.decoder.seg_layers[last - level], head)


def test_resenc_m_has_exactly_the_parameters_of_dna():
    with torch.device("meta"):
        dna = dna_resenc(3, 4, 4, (32, 64, 128, 256, 320, 320), 3, (1, 2, 2, 2, 2, 2), (1, 3, 4, 6, 6, 6))
        ours = ResidualEncoderUNet()
    assert count(dna) == count(ours) == RESENC_M_PARAMETERS
    # Tensor for tensor, in the encoder (same module order) and in all (as a multiset of shapes).
    assert [p.shape for p in dna.encoder.parameters()] == [p.shape for p in ours.encoder.parameters()]
    assert sorted(tuple(p.shape) for p in dna.parameters()) == sorted(tuple(p.shape) for p in ours.parameters())


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_same_weights_give_dnas_outputs_and_deep_supervision_shapes(spatial_dims):
    torch.manual_seed(0)
    filters, strides, blocks = (4, 8, 16, 16), (1, 2, 2, 2), (1, 2, 2, 3)
    dna = dna_resenc(spatial_dims, 2, 3, filters, 3, strides, blocks)
    ours = tiny(spatial_dims)
    assert count(dna) == count(ours)
    copy_dna_weights(dna, ours)
    x = torch.randn((2, 2) + (16,) * spatial_dims)
    dna.train(), ours.train()
    with torch.no_grad():
        expected, got = dna(x), ours(x)
    assert [tuple(o.shape) for o in got] == [tuple(o.shape) for o in expected]
    assert len(got) == len(filters) - 1  # full resolution + every decoder level below it
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected[0], rtol=1e-4, atol=1e-5)


def test_like_dnas_initialisation_the_last_norm_of_every_block_starts_at_zero():
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    dna = dna_resenc(3, 2, 3, (4, 8, 16, 16), 3, (1, 2, 2, 2), (1, 2, 2, 3))
    dna.apply(unet.ResidualEncoderUNet.initialize)
    ours = tiny()
    zero_dna = sorted(n for n, p in dna.named_parameters() if p.ndim == 1 and not p.any() and "conv2.norm" in n)
    zero_ours = sorted(n for n, p in ours.named_parameters() if p.ndim == 1 and not p.any() and "norm2" in n)
    assert len(zero_dna) == len(zero_ours) == 2 * sum((1, 2, 2, 3))  # weight and bias per block


# ---------------------------------------------------------------------------------------------
# Behaviour of our own
# ---------------------------------------------------------------------------------------------


def test_residual_blocks_start_as_their_shortcut():
    ours = tiny()
    block = ours.encoder[1][0]  # stride 2, 4 -> 8 channels: avg-pool then 1x1 conv-norm
    assert isinstance(block, ResidualBlockD)
    assert isinstance(block.shortcut[0], nn.AvgPool3d) and block.shortcut[1].kernel_size == (1, 1, 1)
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), nn.functional.leaky_relu(block.shortcut(x), 0.01))
    identity = ours.encoder[3][1]  # same channels, stride 1: the shortcut is the input itself
    assert identity.shortcut is None
    x = torch.randn(2, 16, 2, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(identity(x), nn.functional.leaky_relu(x, 0.01))
    # Same channels and a stride: only the pooling (DNA builds no 1x1 conv there either).
    with torch.device("meta"):
        m = ResidualEncoderUNet()
    assert [type(layer) for layer in m.encoder[5][0].shortcut] == [nn.AvgPool3d]


def test_deep_supervision_is_nnunets_and_every_head_takes_part_in_the_graph():
    ours = tiny()
    weights = ours.deep_supervision_weights()
    assert weights == pytest.approx([1 / 1.5, 0.5 / 1.5, 0.0])  # nnU-Net v2: the lowest level weighs 0
    with torch.device("meta"):
        assert ResidualEncoderUNet().deep_supervision_weights() == pytest.approx(
            [w / 1.875 for w in (1, 0.5, 0.25, 0.125, 0)]
        )
    loss = build_loss(defaults(), ours)
    assert loss.weights == weights
    outputs = ours.train()(torch.randn(2, 2, 16, 16, 16))
    target = torch.randint(0, 3, (2, 1, 16, 16, 16))
    loss(outputs, target).backward()
    # DDP (no unused-parameter search) needs a gradient on every parameter, the zero-weight head's too.
    assert all(p.grad is not None for p in ours.parameters())
    lowest = ours.deep_supervision_outputs[-1]
    assert all(not p.grad.any() for p in lowest.parameters())
    assert ResidualEncoderUNet(**{**tiny_settings(), "deep_supervision": False}).deep_supervision_weights() == [1.0]


def tiny_settings() -> dict:
    return dict(
        in_channels=2,
        num_classes=3,
        filters=(4, 8, 16),
        kernel_sizes=(3,) * 3,
        strides=(1, 2, 2),
        blocks_per_stage=(1, 1, 1),
    )


def test_sizes_channels_last_and_checkpointing_go_through_the_shared_base():
    ours = tiny(deep_supervision=False)
    assert ours.total_stride() == (8, 8, 8) and ours.output_size((16, 24, 32)) == (16, 24, 32)
    with pytest.raises(ValueError, match="input size 20 on axis 3 .* multiple of 8, e.g. 16 or 24"):
        ours.check_input_size((16, 20, 16))
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        plain = ours.eval()(x)
        optimize_model(ours, channels_last=True)
        assert ours.input_memory_format == torch.channels_last_3d
        torch.testing.assert_close(ours(x), plain, rtol=1e-4, atol=1e-5)
    ours.train().use_checkpointing()
    out = ours(x.requires_grad_(True))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"blocks_per_stage": (1, 2)}, "blocks_per_stage must give at least 1 block for each of the 4 stages"),
        ({"blocks_per_stage": (1, 0, 2, 2)}, "blocks_per_stage"),
        ({"kernel_sizes": (3, 2, 3, 3)}, "odd kernel sizes"),
        ({"strides": (1, 2, 2)}, "strides has 3 entries but filters has 4; give one entry per stage"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"filters": (4, 8), "kernel_sizes": (3, 3), "strides": (1, 2), "blocks_per_stage": (1, 1)}, "at least 3"),
        ({"decoder_convs": 0}, "decoder_convs must be >= 1"),
    ],
)
def test_invalid_arguments_name_the_argument(overrides, fragment):
    with pytest.raises(ModelArgumentError, match=fragment) as error:
        tiny(**overrides)
    assert str(error.value).startswith(error.value.argument)


# ---------------------------------------------------------------------------------------------
# Through the config and the trainer
# ---------------------------------------------------------------------------------------------


def resenc_overrides(cache_root: Path, run_dir: Path, *extra: str) -> list[str]:
    from conftest import tiny_overrides

    # The tiny run with ResEnc chosen on the command line instead of the demo config's unet.
    base = [o for o in tiny_overrides(cache_root, run_dir) if not o.startswith("model.")]
    return [
        *base,
        "data.phantom.shape=[32, 32, 32]",
        "data.patch_size=[32, 32, 32]",
        "model.resenc_unet.filters=[4, 8, 8, 16]",
        "model.resenc_unet.kernel_sizes=[3, 3, 3, 3]",
        "model.resenc_unet.strides=[1, 2, 2, 2]",
        "model.resenc_unet.blocks_per_stage=[1, 2, 2, 2]",
        *extra,
    ]


def test_a_few_training_steps_of_resenc_through_run_training(cache_root, tmp_path):
    from unet_trainer.commands.loading import load_model

    cfg = resolve_config(
        ROOT / "configs" / "demo.yaml", resenc_overrides(cache_root, tmp_path / "run", "max_duration=3ba")
    )
    assert list(cfg["model"]) == ["resenc_unet"]  # the command line's choice replaced the config's unet
    summary = run_training(cfg, progress=False)
    model = summary["state"].unwrapped_model
    assert isinstance(model, ResidualEncoderUNet) and model.deep_supervision_heads == 2
    assert summary["batch"] == 3 and 0.0 <= summary["final_eval"]["dice/mean"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/train"] for r in records if r["kind"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # The checkpoint rebuilds the same network for inference, from its stored config.
    loaded = load_model(Path(summary["checkpoint"]), ["device=cpu"])
    assert isinstance(loaded.model, ResidualEncoderUNet) and not loaded.model.training
    assert (loaded.spatial_dims, loaded.in_channels, loaded.num_outputs) == (3, 4, 4)
    trained = summary["state"].unwrapped_model.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in loaded.model.state_dict().items())
    # And the run resumes from it.
    resumed = run_training(
        resolve_config(
            ROOT / "configs" / "demo.yaml", resenc_overrides(cache_root, tmp_path / "run", "max_duration=4ba")
        ),
        progress=False,
    )
    assert resumed["resumed_from"] is not None and resumed["batch"] == 4
