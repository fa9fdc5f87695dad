"""Every list of layouts (config choices, CLI choices, help texts) is the layout registry's."""

from __future__ import annotations

import re

import pytest

from unet_trainer.cli import evaluate, parsing, predict
from unet_trainer.cli.data import main as data_main
from unet_trainer.config import config, engine
from unet_trainer.data import layouts
from unet_trainer.data import layouts as formats
from unet_trainer.data.layouts import DLE_LABEL_CONVENTIONS, FORMAT_CHOICES, FORMATS, LABEL_CONVENTIONS, LAYOUTS


def test_format_choices_are_auto_then_every_registered_layout():
    assert FORMATS == tuple(LAYOUTS) and "nnunetv2" in FORMATS
    assert FORMAT_CHOICES == ("auto", *LAYOUTS)


def test_config_choices_are_the_registry():
    data = config.SCHEMA["data"]
    assert data["format"].choices == FORMAT_CHOICES and data["format"].default == "auto"
    assert data["dle_labels"].choices == DLE_LABEL_CONVENTIONS == LAYOUTS["dle"].label_choices
    assert data["dle_labels"].default == DLE_LABEL_CONVENTIONS[0]
    assert config.defaults()["data"]["format"] == "auto"
    with pytest.raises(engine.ConfigError) as excinfo:
        engine.check_layer({"data": {"format": "brats2019"}}, "command line", config.SCHEMA)
    assert all(name in str(excinfo.value) for name in FORMAT_CHOICES)


def test_cli_choices_and_help_texts_are_the_registry(capsys):
    assert parsing.FORMAT_CHOICES == FORMAT_CHOICES
    for usage in (evaluate.USAGE, predict.USAGE):
        (line,) = [line for line in usage.splitlines() if line.lstrip().startswith("--format FMT")]
        listed = [name.removesuffix(" (default)") for name in line.split(": ", 1)[1].split(", ")]
        assert listed == list(FORMAT_CHOICES), line
    with pytest.raises(SystemExit):
        data_main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(FORMAT_CHOICES) + "}" in help_text
    assert "{" + ",".join(DLE_LABEL_CONVENTIONS) + "}" in help_text
    assert all(name in help_text.split("source raw dataset folder", 1)[1] for name in FORMATS)
    with pytest.raises(engine.ConfigError, match="nnunetv2"):
        parsing.format_flag({"--format": "brats2019"})
    assert parsing.format_flag({"--format": "nnunetv2"}) == "nnunetv2"


def test_predict_usage_names_every_layouts_label_numbering():
    lines = re.findall(r"^    (.+): NCR (\d), ED (\d), EN (\d)$", predict.USAGE, flags=re.MULTILINE)
    numbering = {layout: tuple(map(int, values)) for names, *values in lines for layout in names.split(", ")}
    glioma = [name for name, layout in LAYOUTS.items() if "t2" in layout.channels]
    assert sorted(numbering) == sorted(glioma)
    assert numbering["brats2021"] == (1, 2, 4) and numbering["brats2023"] == (1, 2, 3)
    assert numbering["msd"] == numbering["nnunetv2"] == (2, 1, 3)
    # The other schemes' numberings, each under the layouts whose files hold it.
    assert "    brats2023 (brats2024-gli): NETC 1, SNFH 2, ET 3, RC 4" in predict.USAGE.splitlines()
    assert "    brats-men-rt: GTV 1" in predict.USAGE.splitlines()


@pytest.mark.parametrize("name", FORMATS)
def test_each_layout_describes_itself(name):
    layout = LAYOUTS[name]
    assert layout.name == name and layout.description.startswith(f"{name} (")
    assert layout.label_convention in LABEL_CONVENTIONS
    assert all(convention in LABEL_CONVENTIONS for convention in layout.label_choices)
    assert all(other in LAYOUTS and other != name for other in layout.refines)


def test_old_import_path_re_exports_the_package():
    assert formats.LAYOUTS is layouts.LAYOUTS and formats.read_case is layouts.read_case
    assert sorted(formats.__all__) == sorted(layouts.__all__)
