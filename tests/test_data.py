"""Phantom, preparation, splits and the patch loader."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from unet_trainer.cli.data import main as data_main
from unet_trainer.data.layouts import DataFormatError, detect_format, list_cases, open_dataset, read_case, write_case
from unet_trainer.data.loader import (
    ContinuousBatchSampler,
    EpochSampler,
    PatchDataset,
    PreparedCase,
    choose_patch_start,
    crop_with_padding,
)
from unet_trainer.data.phantom import make_phantom_case, write_phantom_dataset
from unet_trainer.data.prepare import (
    PrepareSettings,
    nonzero_bounding_box,
    prepare_dataset,
    prepared_is_current,
    zscore_nonzero,
)
from unet_trainer.data.split import kfold_split, load_split_file
from unet_trainer.training.prefetch import DevicePrefetcher


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ds"
    # The simple style: these layout and preparation tests expect every label in each case, and
    # a small brats-style tumour may have no necrosis or no enhancement.
    write_phantom_dataset(out, cases=4, shape=(32, 28, 30), seed=7, progress=False, style="simple")
    return out


def test_phantom_case_is_deterministic_and_has_every_tumour_part():
    # The simple style always holds every tumour part (the brats style is tested below).
    a_img, a_lab = make_phantom_case((32, 32, 32), np.random.default_rng([3, 1]), "simple")
    b_img, b_lab = make_phantom_case((32, 32, 32), np.random.default_rng([3, 1]), "simple")
    c_img, _ = make_phantom_case((32, 32, 32), np.random.default_rng([4, 1]), "simple")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (4, 32, 32, 32) and a_img.dtype == np.float32
    assert set(np.unique(a_lab)) == {0, 1, 2, 3}
    # Background outside the head is exactly zero (what cropping and z-scoring rely on).
    assert a_img[:, 0, 0, 0].tolist() == [0, 0, 0, 0] and (a_img > 0).mean() > 0.3
    # The enhancing rim lights up in T1ce (channel 2) far above the necrotic core.
    assert a_img[2][a_lab == 3].mean() > 2 * a_img[2][a_lab == 1].mean()


def test_phantom_dataset_layout_and_determinism(phantom, tmp_path):
    assert detect_format(phantom) == "brats2021"
    cases = list_cases(phantom)
    assert [c.case_id for c in cases] == [f"BraTS2021_{i:05d}" for i in range(4)]
    seg = nib.load(str(phantom / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"))
    assert set(np.unique(np.asarray(seg.dataobj))) == {0, 1, 2, 4}  # BraTS 2021 labels on disk
    assert seg.shape == (30, 28, 32) and np.allclose(seg.affine, np.eye(4))  # (x, y, z), 1 mm
    again = tmp_path / "again"  # written by 2 processes: the same files as the serial fixture's
    assert write_phantom_dataset(
        again, cases=4, shape=(32, 28, 30), seed=7, progress=False, workers=2, style="simple"
    ) == [c.case_id for c in cases]
    for a, b in zip(cases, list_cases(again), strict=True):
        ra, rb = read_case(a), read_case(b)
        assert np.array_equal(ra.image, rb.image) and np.array_equal(ra.label, rb.label)


def test_phantom_refuses_to_overwrite_other_data(phantom, tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError):
        write_phantom_dataset(tmp_path / "mine", 2, (24, 24, 24), 0, progress=False)
    # Same settings: a no-op returning the ids.
    assert len(write_phantom_dataset(phantom, 4, (32, 28, 30), 7, progress=False, style="simple")) == 4
    # The same cases, seed and shape in another style are other data.
    with pytest.raises(FileExistsError):
        write_phantom_dataset(phantom, 4, (32, 28, 30), 7, progress=False, style="brats")


def test_brats_phantom_is_deterministic_whatever_the_worker_count(tmp_path):
    serial = write_phantom_dataset(tmp_path / "serial", 3, (24, 24, 24), 5, progress=False, style="brats")
    parallel = write_phantom_dataset(
        tmp_path / "parallel", 3, (24, 24, 24), 5, progress=False, workers=2, style="brats"
    )
    assert serial == parallel
    for a, b in zip(list_cases(tmp_path / "serial"), list_cases(tmp_path / "parallel"), strict=True):
        ra, rb = read_case(a), read_case(b)
        assert np.array_equal(ra.image, rb.image) and np.array_equal(ra.label, rb.label)
    with pytest.raises(ValueError, match="style 'round'"):
        make_phantom_case((24, 24, 24), np.random.default_rng(0), "round")


def test_brats_phantom_tumours_are_varied_like_brats():
    from scipy import ndimage

    shape = (48, 48, 48)
    cases = [make_phantom_case(shape, np.random.default_rng([0, i]), "brats") for i in range(24)]
    no_enhancement = sum(not (label == 3).any() for _, label in cases)
    assert 3 <= no_enhancement <= 10  # about a quarter of 24
    tumour_voxels, centre_offsets, satellites = [], [], 0
    for image, label in cases:
        core = (label == 1) | (label == 3)
        assert core.any() and (label == 2).any()
        tumour_voxels.append(int((label > 0).sum()))
        centre_offsets.append(np.linalg.norm(np.argwhere(core).mean(0) - np.array(shape) / 2) / shape[0])
        components = ndimage.label(core)[1]
        satellites += components > 1
        if (label == 3).any() and (label == 1).any():
            # The rim: every enhancing voxel lies within 4 voxels of the core's outside (1 to 4
            # voxels thick), necrosis at least 2 in; enhancement lights up T1ce (channel 2).
            depth = ndimage.distance_transform_edt(core)
            assert depth[label == 3].max() <= 4.0 + 1e-6 and depth[label == 1].min() > 1.0
            assert image[2][label == 3].mean() > 1.5 * image[2][label == 1].mean()
    assert max(tumour_voxels) > 8 * min(tumour_voxels)  # small tumours as well as large
    assert max(centre_offsets) > 0.2 and np.median(centre_offsets) > 0.1  # off-centre
    assert 2 <= satellites <= 14  # occasional satellite lesions


def test_unet_data_synth_cli(tmp_path, capsys):
    assert (
        data_main(["synth", "--out", str(tmp_path / "p"), "--cases", "2", "--shape", "24", "24", "24", "--seed", "1"])
        == 0
    )
    assert len(list_cases(tmp_path / "p")) == 2 and "Wrote 2 phantom cases" in capsys.readouterr().out


def test_bounding_box_and_zscore():
    image = np.zeros((2, 6, 7, 8), np.float32)
    image[0, 1:3, 2:5, 3:4] = 5.0
    image[1, 4, 6, 7] = 2.0
    assert nonzero_bounding_box(image) == ((1, 5), (2, 7), (3, 8))
    image[0, 1:3, 2:5, 3:4] = np.arange(6, dtype=np.float32).reshape(2, 3, 1)
    z = zscore_nonzero(image)
    values = z[0][image[0] != 0]
    assert abs(values.mean()) < 1e-6 and abs(values.std() - 1) < 1e-5
    assert (z[image == 0] == 0).all()


def test_prepare_outputs_metadata_and_is_resumable(phantom, tmp_path):
    out = tmp_path / "prep"
    raw_before = {p: p.stat().st_mtime_ns for p in phantom.rglob("*.nii.gz")}
    record = prepare_dataset(open_dataset(phantom), out, workers=1, progress=False)
    assert record["cases"] == [f"BraTS2021_{i:05d}" for i in range(4)] and record["format"] == "brats2021"
    assert {p: p.stat().st_mtime_ns for p in phantom.rglob("*.nii.gz")} == raw_before  # raw data untouched
    case = PreparedCase(out, "BraTS2021_00001")
    raw = read_case(list_cases(phantom)[1])
    (z0, z1), (y0, y1), (x0, x1) = case.meta["crop_box"]
    assert case.meta["original_shape"] == list(raw.image.shape[1:])
    assert np.allclose(case.meta["affine"], raw.affine) and case.meta["label_convention"] == "brats2021"
    assert case.image.shape == (4, z1 - z0, y1 - y0, x1 - x0) and case.image.dtype == np.float32
    # The metadata puts labels back exactly where they came from.
    restored = np.zeros(raw.label.shape, np.uint8)
    restored[z0:z1, y0:y1, x0:x1] = case.label
    assert np.array_equal(restored, raw.label)
    fg = case.foreground
    assert fg.shape[1] == 4 and set(np.unique(fg[:, 0])) == {1, 2, 3}
    assert (case.label[fg[:, 1], fg[:, 2], fg[:, 3]] == fg[:, 0]).all()
    assert prepared_is_current(out, phantom, PrepareSettings(), list_cases=list_cases)
    # A second run skips every case (no file rewritten); a changed setting redoes them.
    stamp = (out / "BraTS2021_00001_x.npy").stat().st_mtime_ns
    prepare_dataset(open_dataset(phantom), out, workers=1, progress=False)
    assert (out / "BraTS2021_00001_x.npy").stat().st_mtime_ns == stamp
    assert not prepared_is_current(out, phantom, PrepareSettings(target_spacing=(2.0, 2.0, 2.0)), list_cases=list_cases)
    prepare_dataset(
        open_dataset(phantom), out, settings=PrepareSettings(target_spacing=(2.0, 2.0, 2.0)), progress=False
    )
    assert PreparedCase(out, "BraTS2021_00001").image.shape[1] == pytest.approx((z1 - z0) / 2, abs=1)


def test_prepare_resumes_after_an_interrupted_case(phantom, tmp_path):
    out = tmp_path / "prep"
    prepare_dataset(open_dataset(phantom), out, progress=False)
    (out / "BraTS2021_00002_meta.json").unlink()  # as if killed before the marker
    (out / ".BraTS2021_00002_x.npy.123.tmp").write_bytes(b"partial")
    stamp = (out / "BraTS2021_00000_x.npy").stat().st_mtime_ns
    prepare_dataset(open_dataset(phantom), out, progress=False)
    assert (out / "BraTS2021_00002_meta.json").is_file()
    assert (out / "BraTS2021_00000_x.npy").stat().st_mtime_ns == stamp


def test_prepare_bad_case_stops_or_is_skipped(phantom, tmp_path):
    raw = tmp_path / "raw"
    for case in list_cases(phantom)[:3]:
        r = read_case(case)
        write_case(raw, "brats2021", case.case_id, r.image, r.label, r.affine)
    (raw / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").unlink()
    with pytest.raises(DataFormatError, match="BraTS2021_00001"):
        prepare_dataset(open_dataset(raw), tmp_path / "p1", progress=False)
    # Validation of the layout happens before any case is read; make the case readable but corrupt.
    r = read_case(list_cases(phantom)[1])
    write_case(raw, "brats2021", "BraTS2021_00001", r.image, r.label, r.affine)
    path = raw / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match="BraTS2021_00001.*t2"):
        prepare_dataset(open_dataset(raw), tmp_path / "p2", progress=False)
    record = prepare_dataset(open_dataset(raw, skip_bad=True), tmp_path / "p3", progress=False)
    assert record["cases"] == ["BraTS2021_00000", "BraTS2021_00002"] and list(record["skipped"]) == ["BraTS2021_00001"]
    assert data_main(["prepare", str(raw), "--out", str(tmp_path / "p4")]) == 1


def test_kfold_split_is_deterministic_and_complete():
    ids = [f"case{i:03d}" for i in range(484)]
    split = kfold_split(list(reversed(ids)), 5, 0, 0)
    assert (len(split["train"]), len(split["val"])) == (387, 97)  # Composer's fold-0 sizes
    assert split == kfold_split(ids, 5, 0, 0)
    assert split != kfold_split(ids, 5, 0, 12345)
    vals = [set(kfold_split(ids, 5, f, 0)["val"]) for f in range(5)]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == 484
    with pytest.raises(ValueError):
        kfold_split(ids[:3], 5, 0, 0)


def test_split_file(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["c"]}))
    assert load_split_file(path, ["a", "b", "c"]) == {"train": ["a", "b"], "val": ["c"]}
    with pytest.raises(DataFormatError, match="not in the dataset"):
        load_split_file(path, ["a", "b"])
    path.write_text("[1, 2]")
    with pytest.raises(DataFormatError, match="split file must be"):
        load_split_file(path, ["a"])
    path.write_text(json.dumps({"train": ["a", "a", "b"], "val": ["c"]}))  # a repeated training case: oversampled
    assert load_split_file(path, ["a", "b", "c"])["train"] == ["a", "a", "b"]
    path.write_text(json.dumps({"train": ["a"], "val": ["c", "b", "c"]}))
    with pytest.raises(DataFormatError, match="'c' more than once"):
        load_split_file(path, ["a", "b", "c"])
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["b", "c"]}))
    with pytest.raises(DataFormatError, match="in both"):
        load_split_file(path, ["a", "b", "c"])


def test_crop_with_padding_places_small_volumes_in_the_middle():
    image = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) + 1
    label = np.ones((3, 4, 5), np.uint8)
    start = choose_patch_start((3, 4, 5), (5, 4, 3), np.random.default_rng(0), None, 0.0)
    assert start[0] == -1 and start[1] == 0 and 0 <= start[2] <= 2
    out_img, out_lab = crop_with_padding(image, label, start, (5, 4, 3))
    assert out_img.shape == (2, 5, 4, 3) and out_lab.shape == (1, 5, 4, 3)
    assert (out_lab[0, 0] == 0).all() and (out_lab[0, 4] == 0).all() and (out_lab[0, 1:4] == 1).all()
    assert np.array_equal(out_img[:, 1:4], image[:, :, :, start[2] : start[2] + 3])


def test_oversampling_frequency_and_class_balance():
    shape, patch = (64, 64, 64), (8, 8, 8)
    label = np.zeros(shape, np.uint8)
    label[2:4, 2:4, 2:4] = 3  # tiny enhancing blob in a corner
    label[40:60, 40:60, 40:60] = 2  # large oedema
    fg = np.argwhere(label > 0)
    fg = np.concatenate([label[tuple(fg.T)][:, None], fg], 1).astype(np.int32)
    rng = np.random.default_rng(0)
    n = 4000
    hits = {"tiny": 0, "large": 0}
    for _ in range(n):
        start = choose_patch_start(shape, patch, rng, fg, 0.4)
        crop = label[tuple(slice(s, s + p) for s, p in zip(start, patch))]
        hits["tiny"] += bool((crop == 3).any())
        hits["large"] += bool((crop == 2).any())
    # Oversampled patches (40%) pick each present label equally often: ~20% each, plus chance hits.
    chance_tiny = 0.6 * (9**3 / 57**3)
    assert abs(hits["tiny"] / n - (0.2 + chance_tiny)) < 0.03
    assert hits["large"] / n > 0.2


def test_sampler_epochs_positions_and_start(phantom, tmp_path):
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(10))  # each case once per epoch
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in epoch0]
    sampler.set_epoch(0)
    sampler.set_start(4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 6
    # Two ranks split the epoch; together they cover it with the same crop seeds as one rank.
    ranks = [EpochSampler(10, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(0)
    merged = {pair for r in ranks for pair in r}
    assert {i for i, _ in merged} == set(range(10))


def test_patch_dataset_items(phantom, tmp_path):
    out = tmp_path / "prep"
    record = prepare_dataset(open_dataset(phantom), out, progress=False)
    ds = PatchDataset(out, record["cases"], (16, 16, 16), oversampling=1.0)
    image, label = ds[(0, 123)]
    assert image.shape == (4, 16, 16, 16) and image.dtype == torch.float32
    assert label.shape == (1, 16, 16, 16) and label.dtype == torch.uint8
    assert (label > 0).any()  # oversampled onto the tumour
    again_image, _ = ds[(0, 123)]
    assert torch.equal(image, again_image)  # keyed by the seed, not by call order
    slices = PatchDataset(out, record["cases"], (1, 20, 20), oversampling=0.0, squeeze_slice_axis=True)
    image2d, label2d = slices[(1, 5)]
    assert image2d.shape == (4, 20, 20) and label2d.shape == (1, 20, 20)


def test_new_raw_cases_make_the_preparation_stale(phantom, tmp_path):
    raw = tmp_path / "raw"
    for case in list_cases(phantom)[:3]:
        r = read_case(case)
        write_case(raw, "brats2021", case.case_id, r.image, r.label, r.affine)
    out = tmp_path / "prep"
    prepare_dataset(open_dataset(raw), out, progress=False)
    assert prepared_is_current(out, raw, PrepareSettings(), list_cases=list_cases)
    r = read_case(list_cases(phantom)[3])
    write_case(raw, "brats2021", "BraTS2021_00003", r.image, r.label, r.affine)
    assert not prepared_is_current(out, raw, PrepareSettings(), list_cases=list_cases)
    assert prepare_dataset(open_dataset(raw), out, progress=False)["cases"][-1] == "BraTS2021_00003"
    assert prepared_is_current(out, raw, PrepareSettings(), list_cases=list_cases)


def test_crop_keeps_labels_outside_the_nonzero_image():
    image = np.zeros((1, 8, 8, 8), np.float32)
    image[0, 2:4, 2:4, 2:4] = 1.0
    label = np.zeros((8, 8, 8), np.uint8)
    label[6, 6, 6] = 2  # a label where every channel is zero
    assert nonzero_bounding_box(image) == ((2, 4), (2, 4), (2, 4))
    assert nonzero_bounding_box(image, label) == ((2, 7), (2, 7), (2, 7))


def test_continuous_batches_cut_each_epoch_and_resume_anywhere():
    sampler = EpochSampler(10, seed=5)
    batches = ContinuousBatchSampler(sampler, batch_size=4)
    assert batches.batches_per_epoch == 3
    stream = iter(batches)
    first_two_epochs = [next(stream) for _ in range(6)]
    assert [len(b) for b in first_two_epochs] == [4, 4, 2, 4, 4, 2]  # partial last batch per epoch
    for epoch in (0, 1):
        reference = EpochSampler(10, seed=5)
        reference.set_epoch(epoch)
        flat = [item for b in first_two_epochs[3 * epoch : 3 * epoch + 3] for item in b]
        assert flat == list(reference)  # each case once, same order
    batches.set_position(1, 1)  # resume at epoch 1, batch 1
    assert [next(iter(batches)) for _ in range(1)][0] == first_two_epochs[4]
    resumed = iter(batches)
    assert [next(resumed) for _ in range(2)] == first_two_epochs[4:6]


def test_an_epoch_of_sampled_batches_draws_with_replacement_the_same_on_every_rank_and_resume():
    # 3 cases, an epoch of 5 batches of 4 (nnU-Net's fixed epoch): each batch full, cases drawn with replacement.
    batches = ContinuousBatchSampler(EpochSampler(3, seed=7, samples_per_epoch=20), batch_size=4)
    assert batches.batches_per_epoch == 5
    stream = iter(batches)
    two_epochs = [next(stream) for _ in range(10)]
    assert all(len(b) == 4 for b in two_epochs)
    first = [index for b in two_epochs[:5] for index, _ in b]
    assert set(first) <= {0, 1, 2} and len(set(first)) == 3 and len(first) == 20  # repeats, every case seen
    assert [i for b in two_epochs[5:] for i, _ in b] != first  # another draw each epoch
    assert len({seed for b in two_epochs for _, seed in b}) == 40  # a crop seed per position
    batches.set_position(1, 3)  # resume at epoch 1, batch 3: the same batches follow
    resumed = iter(batches)
    assert [next(resumed) for _ in range(2)] == two_epochs[8:10]
    # Two ranks share one global draw, position by position, each with half the batch.
    ranks = [ContinuousBatchSampler(EpochSampler(3, 7, 2, rank, samples_per_epoch=20), 2) for rank in (0, 1)]
    assert all(r.batches_per_epoch == 5 for r in ranks)
    per_rank = [[item for _, b in zip(range(5), iter(r)) for item in b] for r in ranks]
    merged = [item for pair in zip(*per_rank) for item in pair]
    assert merged == [item for b in two_epochs[:5] for item in b]


@pytest.mark.parametrize("enabled", [True, False])
def test_device_prefetcher_yields_every_batch_in_order(enabled):
    batches = [(torch.full((2, 1, 3), float(i)), torch.full((2, 1, 3), i, dtype=torch.uint8)) for i in range(4)]
    prefetcher = DevicePrefetcher(iter(batches), torch.device("cpu"), enabled=enabled)
    got = list(prefetcher)
    assert len(got) == 4
    for (image, label), (ref_image, ref_label) in zip(got, batches):
        assert torch.equal(image, ref_image) and torch.equal(label, ref_label) and image.device.type == "cpu"
    with pytest.raises(StopIteration):
        next(prefetcher)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_prefetcher_on_cuda_matches_the_cpu_batches():
    batches = [
        (torch.randn(2, 4, 8, 8, 8).pin_memory(), torch.randint(0, 4, (2, 1, 8, 8, 8), dtype=torch.uint8))
        for _ in range(5)
    ]
    got = list(DevicePrefetcher(iter(batches), torch.device("cuda"), enabled=True))
    torch.cuda.synchronize()
    assert len(got) == len(batches)
    for (image, label), (ref_image, ref_label) in zip(got, batches):
        assert image.device.type == label.device.type == "cuda"
        assert torch.equal(image.cpu(), ref_image) and torch.equal(label.cpu(), ref_label)
