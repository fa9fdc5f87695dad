"""The opened raw dataset: ``open_dataset`` lists what ``list_cases`` lists and says what it said when a folder
has no cases; preparation through it writes what reading every case through the registry gives; the phantom
and ``write_case`` write through one ``write_layout_case``; a layout chooses the label convention it reads in."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from unet_trainer.data.layouts import (
    FORMATS,
    LAYOUT_DESCRIPTIONS,
    LAYOUTS,
    DataFormatError,
    RawDataset,
    list_cases,
    open_dataset,
    read_case,
    write_case,
)
from unet_trainer.data.layouts.brats import BRATS2021
from unet_trainer.data.layouts.dle import DLE
from unet_trainer.data.layouts.files import write_layout_case
from unet_trainer.data.phantom import make_phantom_case, write_phantom_dataset
from unet_trainer.data.prepare import PrepareSettings, prepare_case, prepare_dataset, prepared_is_current

SHAPE = (24, 26, 28)
# Case ids each layout's releases use.
CASE_IDS = {
    "msd": "BRATS_{:03d}",
    "brats2021": "BraTS2021_{:05d}",
    "brats2023": "BraTS-GLI-{:05d}-000",
    "dle": "BRATS_{:03d}",
    "nnunetv2": "BraTS2021_{:05d}",
    "brats-men-rt": "BraTS-MEN-RT-{:04d}-1",
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "ds"
    write_phantom_dataset(out, cases=3, shape=SHAPE, seed=5, progress=False, style="simple")
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, phantom):
    """The phantom's cases written in every layout, one folder each."""
    root = tmp_path_factory.mktemp("layouts")
    raws = [read_case(case) for case in list_cases(phantom)]
    for fmt in FORMATS:
        for index, raw in enumerate(raws):
            # MEN-RT keeps one channel, T1c, and one label, the tumour volume.
            image, label = (
                (raw.image[[2]], np.isin(raw.label, (1, 3)).astype(np.uint8))
                if fmt == "brats-men-rt"
                else (raw.image, raw.label)
            )
            write_case(root / fmt, fmt, CASE_IDS[fmt].format(index + 1), image, label, raw.affine)
    return root


def _bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_dataset_lists_exactly_what_list_cases_lists(layouts, fmt):
    for asked in ("auto", fmt):
        dataset = open_dataset(layouts / fmt, asked)
        assert isinstance(dataset, RawDataset)
        assert dataset.cases == tuple(list_cases(layouts / fmt, asked))
        assert dataset.layout is LAYOUTS[fmt] and dataset.format == fmt
        assert {case.format for case in dataset.cases} == {fmt}
        assert dataset.root == layouts / fmt and not dataset.skip_bad and dict(dataset.skipped) == {}


def _copy_of(dataset, raw):
    """A writable copy of a BraTS 2021 dataset, case by case (the fixture's own files stay as they are)."""
    for case in list_cases(dataset):
        r = read_case(case)
        write_case(raw, "brats2021", case.case_id, r.image, r.label, r.affine)
    return raw


def test_a_bad_case_stops_opening_or_is_set_aside_with_the_message_list_cases_gives(phantom, tmp_path):
    raw = _copy_of(phantom, tmp_path / "raw")
    (raw / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").unlink()
    with pytest.raises(DataFormatError) as listed:
        list_cases(raw, "brats2021")
    with pytest.raises(DataFormatError) as opened:
        open_dataset(raw, "brats2021")
    assert str(opened.value) == str(listed.value) and "BraTS2021_00001" in str(opened.value)
    bad: dict[str, str] = {}
    good = list_cases(raw, bad=bad)
    dataset = open_dataset(raw, skip_bad=True)
    assert dataset.skip_bad and dict(dataset.skipped) == bad and list(bad) == ["BraTS2021_00001"]
    assert dataset.cases == tuple(good) and [c.case_id for c in good] == ["BraTS2021_00000", "BraTS2021_00002"]


def test_a_folder_without_cases_gets_todays_message(layouts, tmp_path):
    msd = layouts / "msd"
    with pytest.raises(DataFormatError) as forced:
        open_dataset(msd, "brats2021")
    assert str(forced.value) == (
        f"{msd}: no brats2021 cases found; expected {LAYOUT_DESCRIPTIONS['brats2021']}; "
        "the folder looks like msd (format auto detects it)"
    )
    empty = tmp_path / "dle"
    empty.mkdir()
    (empty / "README").write_text("nothing")
    with pytest.raises(DataFormatError) as no_hint:
        open_dataset(empty, "dle")
    assert str(no_hint.value).startswith(f"{empty}: no dle cases found; expected {LAYOUT_DESCRIPTIONS['dle']}")
    assert "looks like" not in str(no_hint.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_preparing_an_opened_dataset_gives_each_case_as_read_through_the_registry(phantom, tmp_path, workers):
    out = tmp_path / "prepared"
    # Resampling runs torch, whose thread pool a forked worker must not inherit in use: it is tried in this process.
    settings = PrepareSettings(target_spacing=(1.5, 1.0, 1.0) if workers == 1 else None)
    record = prepare_dataset(open_dataset(phantom), out, settings, workers=workers, progress=False)
    cases = list_cases(phantom)
    assert record["cases"] == [c.case_id for c in cases] and record["format"] == "brats2021"
    assert record["source"] == str(phantom.resolve()) and record["settings_digest"] == settings.digest()
    for case in cases:
        image, label, meta = prepare_case(read_case(case, settings.dle_labels), settings)
        assert np.array_equal(np.load(out / f"{case.case_id}_x.npy"), image)
        assert np.array_equal(np.load(out / f"{case.case_id}_y.npy"), label)
        written = json.loads((out / f"{case.case_id}_meta.json").read_text())
        assert written == {**meta, "settings_digest": settings.digest()}
    assert prepared_is_current(out, phantom, settings, list_cases=list_cases)
    assert prepared_is_current(out, phantom, settings, "brats2021", list_cases=list_cases)
    assert not prepared_is_current(out, phantom, settings, "msd", list_cases=list_cases)


def test_a_preparation_that_skipped_a_bad_case_stays_current(phantom, tmp_path):
    raw = _copy_of(phantom, tmp_path / "raw")
    (raw / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").unlink()
    out = tmp_path / "prepared"
    record = prepare_dataset(open_dataset(raw, skip_bad=True), out, progress=False)
    assert list(record["skipped"]) == ["BraTS2021_00002"] and "seg" in record["skipped"]["BraTS2021_00002"]
    assert prepared_is_current(out, raw, PrepareSettings(), list_cases=list_cases)
    # Without skip_bad the same folder stops at the case, before anything is prepared again.
    with pytest.raises(DataFormatError, match="BraTS2021_00002"):
        prepare_dataset(open_dataset(raw), tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_an_opened_dataset_and_every_layout_travel_to_worker_processes(layouts):
    for fmt in FORMATS:
        dataset = open_dataset(layouts / fmt)
        travelled = pickle.loads(pickle.dumps(dataset))
        assert travelled.cases == dataset.cases and travelled.format == fmt and travelled.root == dataset.root
        case = dataset.cases[0]
        here, there = dataset.layout.read_case(case, "msd"), travelled.layout.read_case(case, "msd")
        assert np.array_equal(here.image, there.image) and np.array_equal(here.label, there.label)


def test_write_case_and_the_phantom_write_through_write_layout_case(tmp_path):
    image, label = make_phantom_case(SHAPE, np.random.default_rng([5, 1]), "simple")
    by_name = write_case(tmp_path / "a", "brats2021", "BraTS2021_00001", image, label, np.eye(4))
    by_layout = write_layout_case(tmp_path / "b", BRATS2021, "BraTS2021_00001", image, label, np.eye(4))
    assert by_name.case_id == by_layout.case_id and by_name.format == by_layout.format == "brats2021"
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    write_phantom_dataset(tmp_path / "phantom", cases=2, shape=SHAPE, seed=5, progress=False, style="simple")
    assert (
        _bytes(tmp_path / "phantom")["BraTS2021_00001/BraTS2021_00001_seg.nii.gz"]
        == (_bytes(tmp_path / "a")["BraTS2021_00001/BraTS2021_00001_seg.nii.gz"])
    )
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        write_case(tmp_path / "c", "nope", "x", image, label, np.eye(4))
    for bad_id in ("", ".hidden", "a/b", " a"):
        with pytest.raises(ValueError, match="case id"):
            write_layout_case(tmp_path / "c", BRATS2021, bad_id, image, label, np.eye(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        write_layout_case(tmp_path / "c", BRATS2021, "x", np.full_like(image, np.nan), label, np.eye(4))
    assert not (tmp_path / "c").exists()


def test_a_layout_chooses_the_convention_it_reads_labels_in(layouts):
    assert BRATS2021.read_convention("brats2023") == "brats2021"  # its files say their numbering
    assert DLE.read_convention("brats2023") == "brats2023" and DLE.read_convention("msd") == "msd"
    with pytest.raises(ValueError, match="dle_labels must be one of"):
        DLE.read_convention("brats2021")
    (case,) = list_cases(layouts / "dle")[:1]
    for choice in ("msd", "brats2023"):
        through_layout, through_registry = DLE.read_case(case, choice), read_case(case, choice)
        assert through_layout.label_convention == through_registry.label_convention == choice
        assert np.array_equal(through_layout.label, through_registry.label)


FORKED_AFTER_RESAMPLING = """
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unet_trainer.data.layouts import open_dataset
from unet_trainer.data.phantom import write_phantom_dataset
from unet_trainer.data.prepare import PrepareSettings, prepare_dataset

root = Path(sys.argv[1])
write_phantom_dataset(root / "raw", cases=3, shape=(64, 64, 64), seed=0, progress=False)
settings = PrepareSettings(target_spacing=(1.5, 1.5, 1.5))
prepare_dataset(open_dataset(root / "raw"), root / "one", settings, workers=1, progress=False)
# The parent's own trilinear interpolation starts torch's OpenMP thread pool before the workers are forked.
F.interpolate(torch.rand(1, 4, 48, 48, 48), size=(40, 40, 40), mode="trilinear")
prepare_dataset(open_dataset(root / "raw"), root / "two", settings, workers=2, progress=False)
for path in sorted((root / "one").glob("*.npy")):
    assert np.array_equal(np.load(path), np.load(root / "two" / path.name)), path.name
print("prepared", len(list((root / "two").glob("*_x.npy"))))
"""


def test_workers_forked_after_the_parent_resampled_prepare_the_same_arrays(tmp_path):
    # Before each worker took one thread, the forked workers waited forever for their parent's OpenMP threads.
    script = tmp_path / "forked.py"
    script.write_text(FORKED_AFTER_RESAMPLING)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["prepared", "3"]
