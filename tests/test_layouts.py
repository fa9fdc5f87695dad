"""Every raw layout trains through ``unet-train``; every bad input is one clear line through the CLI.

These are command-line checks on tiny datasets (24^3 phantom cases). The reader's own unit tests
(label tables, axis order, each validation rule) are in test_formats.py; here the question is
what a user sees: an exit status, one ``error:`` line naming the case and the file, no traceback,
and ``--skip-bad`` listing what it left out.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.data import main as data_main
from unet_trainer.cli.train import main as train_main
from unet_trainer.data.layouts import FORMATS, LABEL_CONVENTIONS, list_cases, write_case
from unet_trainer.data.phantom import make_phantom_case
from unet_trainer.data.prepare import PrepareSettings, prepared_is_current, zscore_nonzero

SHAPE = (24, 24, 24)
NUM_CASES = 6
CASE_ID_PATTERNS = {
    "msd": "BRATS_{:03d}",
    "brats2021": "BraTS2021_{:05d}",
    "brats2023": "BraTS-GLI-{:05d}-000",
    "dle": "BRATS_{:03d}",  # DLE arrays are preprocessed MSD cases and keep MSD's ids
    "nnunetv2": "BraTS2021_{:05d}",  # nnU-Net's BraTS 2021 conversion keeps the BraTS ids
    "brats-men-rt": "BraTS-MEN-RT-{:04d}-1",
}
# The label convention of each layout's files where it is not the layout's own name.
NATIVE_CONVENTION = {"nnunetv2": "msd"}  # nnU-Net's BraTS numbering is MSD's
DEMO = str(ROOT / "configs" / "demo.yaml")


def case_id(layout: str, index: int) -> str:
    return CASE_ID_PATTERNS[layout].format(index + 1)


@pytest.fixture(scope="module")
def phantom_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Six (image (4, 24, 24, 24) float32, canonical label (24, 24, 24) uint8) phantom cases."""
    return [make_phantom_case(SHAPE, np.random.default_rng([11, i])) for i in range(NUM_CASES)]


def in_layout(layout: str, image: np.ndarray, label: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A glioma phantom case as ``layout`` holds it: MEN-RT keeps T1c and calls the core the tumour volume."""
    if layout != "brats-men-rt":
        return image, label
    return image[[2]], None if label is None else np.isin(label, (1, 3)).astype(np.uint8)


def write_dataset(root: Path, layout: str, cases: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write ``cases`` in ``layout`` under ``root`` (1 mm identity affine) and return ``root``."""
    for index, case in enumerate(cases):
        image, label = in_layout(layout, *case)
        if layout == "dle":
            # DLE arrays are already normalised; the preparation only crops them.
            image = zscore_nonzero(image)
        write_case(root, layout, case_id(layout, index), image, label, np.eye(4))
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, phantom_cases) -> dict[str, Path]:
    """The same six cases written once in each layout."""
    base = tmp_path_factory.mktemp("layouts")
    return {layout: write_dataset(base / layout, layout, phantom_cases) for layout in FORMATS}


def native_labels_on_disk(root: Path, layout: str, index: int) -> np.ndarray:
    """The label file of case ``index`` as stored, (Z, Y, X) native values (an oracle independent of the reader)."""
    cid = case_id(layout, index)
    if layout == "dle":
        return np.load(root / f"{cid}_y.npy", allow_pickle=False)[0]
    path = {
        "msd": root / "labelsTr" / f"{cid}.nii.gz",
        "brats2021": root / cid / f"{cid}_seg.nii.gz",
        "brats2023": root / cid / f"{cid}-seg.nii.gz",
        "nnunetv2": root / "labelsTr" / f"{cid}.nii.gz",
        "brats-men-rt": root / cid / f"{cid}_gtv.nii.gz",
    }[layout]
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def prepared_folder(cache: Path) -> Path:
    (record,) = (cache / "prepared").glob("*/prepare.json")
    return record.parent


def assert_one_error_line(err: str, *needles: str) -> str:
    """``err`` is exactly one line, starting with ``error:``, holding every needle; returns it."""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_train_fails_with_one_line(err: str, *needles: str) -> str:
    """``unet-train``'s stderr ends in one ``error:`` line naming every needle, with no traceback.

    Lines before it are the run's own progress notes (e.g. "Preparing SRC -> DST"), never errors.
    """
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


# ---------------------------------------------------------------------------
# Every layout trains
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", FORMATS)
def test_every_layout_trains_through_unet_train(layout, datasets, phantom_cases, tmp_path, capsys):
    source = datasets[layout]
    cache, run = tmp_path / "cache", tmp_path / "run"
    status = train_main([DEMO, *tiny_overrides(cache, run, f"data.path={source}", "max_duration=2ba")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in (run / "checkpoints").glob("ep*-rank0.pt")) == [
        "ep0-ba1-rank0.pt",
        "ep1-ba2-rank0.pt",
    ]
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [case_id(layout, i) for i in range(NUM_CASES)]

    prepared = prepared_folder(cache)
    record = json.loads((prepared / "prepare.json").read_text())
    assert record["format"] == layout and record["skipped"] == {}
    for index, case in enumerate(phantom_cases):
        _, written = in_layout(layout, *case)
        cid = case_id(layout, index)
        meta = json.loads((prepared / f"{cid}_meta.json").read_text())
        # DLE arrays record the numbering they were read with (MSD's by default).
        assert meta["label_convention"] == ("msd" if layout == "dle" else NATIVE_CONVENTION.get(layout, layout))
        label = np.load(prepared / f"{cid}_y.npy", allow_pickle=False)
        assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= {0, 1, 2, 3}
        # Canonical labels put back into the raw grid are exactly the labels that were written.
        restored = np.zeros(SHAPE, np.uint8)
        restored[tuple(slice(a, b) for a, b in meta["crop_box"])] = label
        assert np.array_equal(restored, written), cid
        # The file held the layout's own numbering, so the canonical mapping really was applied.
        native = native_labels_on_disk(source, layout, index)
        convention = LABEL_CONVENTIONS[NATIVE_CONVENTION.get(layout, layout)]
        expected_native = {canonical: native_value for native_value, canonical in convention.items()}
        assert np.array_equal(native, np.vectorize(expected_native.get)(written)), cid


@pytest.mark.parametrize("layout", FORMATS)
def test_forced_format_trains(layout, datasets, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    status = train_main(
        [
            DEMO,
            *tiny_overrides(cache, run, f"data.path={datasets[layout]}", f"data.format={layout}", "max_duration=1ba"),
        ]
    )
    assert status == 0, capsys.readouterr().err
    assert json.loads((prepared_folder(cache) / "prepare.json").read_text())["format"] == layout
    assert (run / "checkpoints" / "ep0-ba1-rank0.pt").is_file()


@pytest.mark.parametrize("layout", FORMATS)
def test_wrong_forced_format_fails_with_one_line(layout, datasets, tmp_path, capsys):
    # Force every other layout onto this dataset: each must stop before training, in one line.
    for forced in FORMATS:
        if forced == layout:
            continue
        run = tmp_path / f"run-{forced}"
        status = train_main(
            [
                DEMO,
                *tiny_overrides(
                    tmp_path / f"cache-{forced}", run, f"data.path={datasets[layout]}", f"data.format={forced}"
                ),
            ]
        )
        assert status != 0
        assert_train_fails_with_one_line(capsys.readouterr().err, str(datasets[layout]))
        assert not (run / "checkpoints").exists()
        status = data_main(
            ["prepare", str(datasets[layout]), "--out", str(tmp_path / f"p-{forced}"), "--format", forced]
        )
        assert status != 0
        assert_one_error_line(capsys.readouterr().err, str(datasets[layout]), forced)


def test_forced_format_is_checked_against_an_existing_preparation(datasets, tmp_path):
    out = tmp_path / "prepared"
    assert data_main(["prepare", str(datasets["brats2021"]), "--out", str(out), "--workers", "1"]) == 0
    settings = PrepareSettings()
    assert prepared_is_current(out, datasets["brats2021"], settings, list_cases=list_cases)
    assert prepared_is_current(out, datasets["brats2021"], settings, fmt="brats2021", list_cases=list_cases)
    # A preparation made under another layout is not what a forced format asks for.
    assert not prepared_is_current(out, datasets["brats2021"], settings, fmt="msd", list_cases=list_cases)


# ---------------------------------------------------------------------------
# Bad inputs: one line naming the case and the file
# ---------------------------------------------------------------------------

BAD_CASE = "BraTS2021_00002"  # the damaged case in the brats2021 dataset


def seg_path(root: Path) -> Path:
    return root / BAD_CASE / f"{BAD_CASE}_seg.nii.gz"


def modality_path(root: Path, suffix: str) -> Path:
    return root / BAD_CASE / f"{BAD_CASE}_{suffix}.nii.gz"


def load_xyz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def save_xyz(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def remove_t1ce(root: Path) -> str:
    modality_path(root, "t1ce").unlink()
    return f"{BAD_CASE}_t1ce"


def seg_shape_differs(root: Path) -> str:
    data, affine = load_xyz(seg_path(root))
    save_xyz(seg_path(root), np.ascontiguousarray(data[:, :, :-1]), affine)
    return seg_path(root).name


def seg_affine_differs(root: Path) -> str:
    data, affine = load_xyz(seg_path(root))
    shifted = affine.copy()
    shifted[0, 3] += 1.0  # one voxel along x
    save_xyz(seg_path(root), data, shifted)
    return seg_path(root).name


def modality_affine_differs(root: Path) -> str:
    path = modality_path(root, "t2")
    data, affine = load_xyz(path)
    save_xyz(path, data, np.diag([1.0, 1.0, 1.2, 1.0]))
    return path.name


def label_value(value: float, dtype) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        data, affine = load_xyz(seg_path(root))
        data = data.astype(dtype)
        data[12, 12, 12] = value
        save_xyz(seg_path(root), data, affine)
        return seg_path(root).name

    return damage


def voxel_value(suffix: str, value: float) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        path = modality_path(root, suffix)
        data, affine = load_xyz(path)
        data = data.astype(np.float32)
        data[3, 4, 5] = value
        save_xyz(path, data, affine)
        return path.name

    return damage


def truncate(suffix: str, keep: float) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        path = modality_path(root, suffix)
        content = path.read_bytes()
        path.write_bytes(content[: int(len(content) * keep)])
        return path.name

    return damage


def garbage(suffix: str, compressed: bool) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        path = modality_path(root, suffix)
        noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        path.write_bytes(gzip.compress(noise) if compressed else noise)
        return path.name

    return damage


def empty_file(root: Path) -> str:
    seg_path(root).write_bytes(b"")
    return seg_path(root).name


# name -> (damage(root) returning the file name the message must hold, words it must hold)
BAD_INPUTS: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "missing modality": (remove_t1ce, ("missing", "t1ce")),
    "segmentation shape differs": (seg_shape_differs, ("shape",)),
    "segmentation affine differs": (seg_affine_differs, ("affine",)),
    "modality affine differs": (modality_affine_differs, ("affine",)),
    "unknown label 5": (label_value(5, np.uint8), ("unknown label", "5")),
    "BraTS 2023 enhancing label 3 in BraTS 2021": (label_value(3, np.uint8), ("unknown label", "[3]")),
    "non-integer label 0.5": (label_value(0.5, np.float32), ("non-integer", "0.5")),
    "NaN voxel": (voxel_value("flair", np.nan), ("NaN",)),
    "Inf voxel": (voxel_value("t1", np.inf), ("Inf",)),
    "truncated .nii.gz": (truncate("t2", 0.5), ("cannot read",)),
    "truncated inside the header": (truncate("flair", 0.02), ("cannot read",)),
    "garbage bytes .nii.gz": (garbage("t1", compressed=False), ("cannot read",)),
    "gzip of garbage .nii.gz": (garbage("t1ce", compressed=True), ("cannot read",)),
    "empty segmentation file": (empty_file, ("cannot read",)),
}


@pytest.fixture(scope="module")
def good_brats2021(tmp_path_factory, phantom_cases) -> Path:
    """Three valid brats2021 cases; tests copy it and damage one case."""
    return write_dataset(tmp_path_factory.mktemp("good") / "brats2021", "brats2021", phantom_cases[:3])


@pytest.fixture(params=list(BAD_INPUTS), ids=list(BAD_INPUTS))
def bad_dataset(request, good_brats2021, tmp_path) -> tuple[Path, str, tuple[str, ...]]:
    """(dataset with case BAD_CASE damaged, file name the error must name, words it must hold)."""
    root = tmp_path / "raw"
    shutil.copytree(good_brats2021, root)
    damage, words = BAD_INPUTS[request.param]
    return root, damage(root), words


def test_bad_input_is_one_error_line_from_prepare(bad_dataset, tmp_path, capsys):
    root, file_name, words = bad_dataset
    status = data_main(["prepare", str(root), "--out", str(tmp_path / "prepared")])
    captured = capsys.readouterr()
    assert status != 0
    assert_one_error_line(captured.err, f"case {BAD_CASE}", file_name, *words)
    assert not (tmp_path / "prepared" / "prepare.json").exists()


def test_skip_bad_skips_and_lists_the_bad_case(bad_dataset, tmp_path, capsys):
    root, file_name, _ = bad_dataset
    out = tmp_path / "prepared"
    status = data_main(["prepare", str(root), "--out", str(out), "--skip-bad"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Prepared 2 brats2021 cases" in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith(f"skipped {BAD_CASE}: ") and file_name in line
    record = json.loads((out / "prepare.json").read_text())
    assert record["cases"] == ["BraTS2021_00001", "BraTS2021_00003"] and list(record["skipped"]) == [BAD_CASE]
    assert not (out / f"{BAD_CASE}_meta.json").exists()


@pytest.mark.parametrize("bad_dataset", ["unknown label 5", "missing modality", "truncated .nii.gz"], indirect=True)
def test_unet_train_on_a_bad_dataset_fails_with_one_line(bad_dataset, tmp_path, capsys):
    root, file_name, words = bad_dataset
    run = tmp_path / "run"
    status = train_main([DEMO, *tiny_overrides(tmp_path / "cache", run, f"data.path={root}")])
    assert status != 0
    assert_train_fails_with_one_line(capsys.readouterr().err, f"case {BAD_CASE}", file_name, *words)
    assert not (run / "checkpoints").exists()


def write_bad_msd(root: Path, phantom_cases) -> tuple[str, str]:
    """MSD case BRATS_002 with three channels instead of four (a missing modality)."""
    write_dataset(root, "msd", phantom_cases[:2])
    path = root / "imagesTr" / "BRATS_002.nii.gz"
    data, affine = load_xyz(path)
    save_xyz(path, np.ascontiguousarray(data[..., :3]), affine)
    return "BRATS_002", path.name


def write_bad_dle(root: Path, phantom_cases) -> tuple[str, str]:
    """DLE case BRATS_002 with a NaN voxel."""
    write_dataset(root, "dle", phantom_cases[:2])
    path = root / "BRATS_002_x.npy"
    image = np.load(path, allow_pickle=False)
    image[1, 2, 3, 4] = np.nan
    np.save(path, image, allow_pickle=False)
    return "BRATS_002", path.name


def write_truncated_dle(root: Path, phantom_cases) -> tuple[str, str]:
    write_dataset(root, "dle", phantom_cases[:2])
    path = root / "BRATS_002_y.npy"
    path.write_bytes(path.read_bytes()[:200])
    return "BRATS_002", path.name


def write_bad_brats2023(root: Path, phantom_cases) -> tuple[str, str]:
    """BraTS 2023 case with a label 5, unknown in every BraTS numbering (4 is 2024's resection cavity)."""
    write_dataset(root, "brats2023", phantom_cases[:2])
    cid = case_id("brats2023", 1)
    path = root / cid / f"{cid}-seg.nii.gz"
    data, affine = load_xyz(path)
    data = data.copy()
    data[data == 3] = 5
    save_xyz(path, data, affine)
    return cid, path.name


@pytest.mark.parametrize(
    "writer",
    [write_bad_msd, write_bad_dle, write_truncated_dle, write_bad_brats2023],
    ids=["msd three channels", "dle NaN", "dle truncated label", "brats2023 label 5"],
)
def test_bad_input_in_other_layouts(writer, phantom_cases, tmp_path, capsys):
    bad_case, file_name = writer(tmp_path / "raw", phantom_cases)
    assert data_main(["prepare", str(tmp_path / "raw"), "--out", str(tmp_path / "p")]) != 0
    assert_one_error_line(capsys.readouterr().err, f"case {bad_case}", file_name)
    assert data_main(["prepare", str(tmp_path / "raw"), "--out", str(tmp_path / "p"), "--skip-bad"]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"skipped {bad_case}: ") and file_name in line


def test_empty_and_unrecognised_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert data_main(["prepare", str(empty), "--out", str(tmp_path / "p1")]) != 0
    assert_one_error_line(capsys.readouterr().err, str(empty), "empty", *FORMATS)

    unrecognised = tmp_path / "photos"
    (unrecognised / "holiday").mkdir(parents=True)
    (unrecognised / "holiday" / "beach.jpg").write_bytes(b"\xff\xd8\xff")
    (unrecognised / "notes.txt").write_text("not a dataset")
    assert data_main(["prepare", str(unrecognised), "--out", str(tmp_path / "p2")]) != 0
    assert_one_error_line(capsys.readouterr().err, str(unrecognised), "no known layout", *FORMATS)

    missing = tmp_path / "nowhere"
    assert data_main(["prepare", str(missing), "--out", str(tmp_path / "p3")]) != 0
    assert_one_error_line(capsys.readouterr().err, str(missing))
    # --skip-bad skips bad cases, not a folder that holds none.
    assert data_main(["prepare", str(empty), "--out", str(tmp_path / "p4"), "--skip-bad"]) != 0
    assert_one_error_line(capsys.readouterr().err, str(empty))

    status = train_main([DEMO, *tiny_overrides(tmp_path / "cache", tmp_path / "run", f"data.path={unrecognised}")])
    assert status != 0
    assert_train_fails_with_one_line(capsys.readouterr().err, str(unrecognised), "no known layout")


def test_every_case_bad_is_one_line_even_with_skip_bad(good_brats2021, tmp_path, capsys):
    root = tmp_path / "raw"
    shutil.copytree(good_brats2021, root)
    for folder in root.iterdir():
        if folder.is_dir():
            (folder / f"{folder.name}_flair.nii.gz").write_bytes(b"not a nifti")
    assert data_main(["prepare", str(root), "--out", str(tmp_path / "p"), "--skip-bad"]) != 0
    assert_one_error_line(capsys.readouterr().err, "every case", "BraTS2021_00001", "flair")


def test_dle_label_numbering_is_chosen_explicitly(tmp_path):
    """DLE arrays made from BraTS 2021 hold 2023 numbering (1 NCR, 2 ED, 3 ET); made from MSD they
    hold MSD's (1 ED, 2 NET, 3 ET). data.dle_labels / --dle-labels says which; the default is MSD."""
    import numpy as np

    from unet_trainer.cli.data import main as data_main
    from unet_trainer.data.loader import PreparedCase

    src = tmp_path / "dle"
    src.mkdir()
    image = np.random.default_rng(0).normal(size=(4, 6, 6, 6)).astype(np.float32)
    native = np.zeros((1, 6, 6, 6), np.uint8)
    native[0, 1, 1, 1], native[0, 2, 2, 2], native[0, 3, 3, 3] = 1, 2, 3
    for case in ("a", "b"):
        np.save(src / f"{case}_x.npy", image)
        np.save(src / f"{case}_y.npy", native)
    assert data_main(["prepare", str(src), "--out", str(tmp_path / "as_msd")]) == 0
    assert data_main(["prepare", str(src), "--out", str(tmp_path / "as_2023"), "--dle-labels", "brats2023"]) == 0
    as_msd = PreparedCase(tmp_path / "as_msd", "a")
    as_2023 = PreparedCase(tmp_path / "as_2023", "a")
    crop = as_msd.meta["crop_box"]
    at = lambda case, z: int(case.label[z - crop[0][0], z - crop[1][0], z - crop[2][0]])  # noqa: E731
    assert [at(as_msd, z) for z in (1, 2, 3)] == [2, 1, 3]  # MSD: 1 edema, 2 core
    assert [at(as_2023, z) for z in (1, 2, 3)] == [1, 2, 3]  # 2023: 1 core, 2 edema
    assert as_2023.meta["label_convention"] == "brats2023"
