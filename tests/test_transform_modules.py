"""Where the augmentation lives: the base (batch_transform), the transforms (spatial, intensity), the recipe
and the augmenter (augment); the recipe's order, which assigns the random streams; the settings checked
through Field.check."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest

from unet_trainer.core.schema import Field, fields_of
from unet_trainer.training import augment, batch_transform, intensity, spatial
from unet_trainer.training.augment import AUGMENTATIONS, BatchAugmenter, recipe
from unet_trainer.training.batch_transform import SUPPLIED_SETTINGS, BatchTransform, PerSampleTransform, SettingError
from unet_trainer.training.intensity import Brightness, Contrast, GaussianBlur, GaussianNoise
from unet_trainer.training.spatial import Flip

TRANSFORM_MODULES = ("unet_trainer.training.spatial", "unet_trainer.training.intensity")

# The recipe as it has always been: its order is the order the transforms run and take their columns of
# the one parameter draw per batch, so it is what a seed means.
RECIPE_ORDER = [
    ("flip", "unet_trainer.training.spatial", "Flip"),
    ("noise", "unet_trainer.training.intensity", "GaussianNoise"),
    ("blur", "unet_trainer.training.intensity", "GaussianBlur"),
    ("brightness", "unet_trainer.training.intensity", "Brightness"),
    ("contrast", "unet_trainer.training.intensity", "Contrast"),
]
# nnU-Net's, appended after them: each draws from its own stream, so the five keep their values.
APPENDED = [
    ("rotate_scale", "unet_trainer.training.spatial", "RotateScale"),
    ("channel_blur", "unet_trainer.training.intensity", "ChannelBlur"),
    ("channel_brightness", "unet_trainer.training.intensity", "ChannelBrightness"),
    ("channel_contrast", "unet_trainer.training.intensity", "ChannelContrast"),
    ("low_resolution", "unet_trainer.training.intensity", "LowResolution"),
    ("inverted_gamma", "unet_trainer.training.intensity", "InvertedGamma"),
    ("gamma", "unet_trainer.training.intensity", "Gamma"),
]


def test_every_registered_transform_is_defined_in_a_transform_module():
    for name, transform in AUGMENTATIONS.items():
        assert transform.__module__ in TRANSFORM_MODULES, (name, transform.__module__)
        assert issubclass(transform, BatchTransform)


def test_the_registry_order_is_the_recipe_as_it_was():
    registered = [(name, cls.__module__, cls.__qualname__) for name, cls in AUGMENTATIONS.items()]
    assert registered == RECIPE_ORDER + APPENDED
    assert list(AUGMENTATIONS.values())[:5] == [Flip, GaussianNoise, GaussianBlur, Brightness, Contrast]
    assert list(recipe()) == [name for name, _, _ in RECIPE_ORDER + APPENDED]
    # The five share the one recipe draw, in this order; a transform added later draws from its own stream.
    assert [cls.shares_recipe_draw for cls in AUGMENTATIONS.values()] == [True] * 5 + [False] * len(APPENDED)
    assert list(BatchAugmenter(recipe(), 3, "cpu", seed=0).sample_parameters(2).draws) == list(AUGMENTATIONS)


def test_the_base_the_transforms_and_the_augmenter_live_in_their_modules():
    assert (
        BatchTransform.__module__
        == PerSampleTransform.__module__
        == SettingError.__module__
        == batch_transform.__name__
    )
    assert BatchAugmenter.__module__ == augment.__name__
    assert all(issubclass(cls, PerSampleTransform) for cls in (GaussianNoise, GaussianBlur, Brightness, Contrast))
    assert not issubclass(Flip, PerSampleTransform)
    # No shim under the old name.
    assert importlib.util.find_spec("unet_trainer.training.transforms") is None


def _training_imports(module) -> set[str]:
    """The sibling modules of ``unet_trainer.training`` that ``module`` imports (relative imports only)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "")
    return names


def test_the_import_chain_is_registry_then_transforms_then_base():
    assert _training_imports(batch_transform) == set()
    assert _training_imports(spatial) == {"batch_transform"}
    assert _training_imports(intensity) == {"batch_transform"}
    assert _training_imports(augment) == {"batch_transform", "spatial", "intensity"}


@pytest.mark.parametrize("cls", list(AUGMENTATIONS.values()), ids=list(AUGMENTATIONS))
def test_a_transforms_settings_are_checked_through_field_check(cls, monkeypatch):
    checked = []
    original = Field.check

    def recording_check(self, value):
        checked.append(value)
        return original(self, value)

    monkeypatch.setattr(Field, "check", recording_check)
    transform = cls()
    settings = fields_of(cls, exclude=SUPPLIED_SETTINGS)
    assert checked == [getattr(transform, name) for name in settings]

    # What Field.check rejects, the transform rejects with Field.check's words.
    checked.clear()
    probability = next(name for name in settings if name.startswith("p"))  # p, or p_rotation
    with pytest.raises(SettingError) as error:
        cls(**{probability: 1.5})
    assert checked == [1.5]
    assert error.value.setting == probability and error.value.value == 1.5
    try:
        original(settings[probability], 1.5)
    except Exception as field_error:
        assert error.value.expected == field_error.expected
    else:
        pytest.fail("Field.check accepted p=1.5")
