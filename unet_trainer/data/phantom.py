"""A synthetic BraTS-format phantom: the embedded default dataset.

Each case is a head (scalp, skull, CSF, grey and white matter, ventricles) whose tissues have
different contrasts in FLAIR, T1, T1ce and T2, holding a tumour built like a glioma. Two styles:

- ``brats`` (the default): the tumour sits anywhere in white matter, off-centre, with a lobulated
  core whose radius is log-uniform (small tumours as often as large ones). Three in four cores
  have an enhancing rim (label 4) 1-4 voxels thick, varying around the core, with necrosis
  (label 1) inside; the others do not enhance at all and are non-enhancing tumour (label 1)
  throughout. Oedema (label 2) reaches out unevenly, mostly along white matter; about three cases
  in ten have one or two small satellite lesions. Tumour contrasts vary per case.
- ``simple``: one lobulated concentric tumour near the centre (necrotic core inside an enhancing
  rim at least 2 voxels thick inside oedema) that always enhances; easy, kept for comparison.

A smooth bias field, Rician-like noise and a per-modality intensity scale make the intensities
look like raw MRI, so the whole preparation pipeline (crop, z-score) has real work to do.

Cases are written in the BraTS 2021 layout, one folder per case with
``BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz`` and a 1 mm identity-direction affine.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ..core.runfolder import FolderLock
from ..core.workers import worker_pool
from .layouts.brats import BRATS2021, BRATS2023, BRATS_MEN_RT
from .layouts.canonical import Layout
from .layouts.files import write_layout_case
from .layouts.msd import MSD
from .phantom_tumours import cyst, meningioma, metastases, random_voxel, resection_cavity, smooth_field

# Mean intensity of each tissue in (flair, t1, t1ce, t2), loosely after real 3T contrasts:
# CSF is dark in FLAIR and T1, bright in T2; oedema is bright in FLAIR and T2; the enhancing rim
# lights up only after contrast (T1ce); the necrotic core is dark in T1ce and bright in T2.
TISSUE_CONTRAST = {
    "scalp": (0.55, 0.90, 0.90, 0.45),
    "skull": (0.10, 0.20, 0.20, 0.10),
    "csf": (0.08, 0.18, 0.20, 1.00),
    "grey": (0.55, 0.55, 0.58, 0.60),
    "white": (0.45, 0.80, 0.82, 0.40),
    "edema": (1.10, 0.45, 0.48, 1.05),
    "enhancing": (0.85, 0.55, 1.55, 0.80),
    "necrotic": (0.60, 0.25, 0.22, 1.30),
    # Non-enhancing tumour (label 1 of a tumour without enhancement): FLAIR/T2-bright, T1-dark.
    "nonenhancing": (0.95, 0.40, 0.42, 1.15),
}
# Fluid structures: a resection cavity is dark in T1 and T1ce, bright in T2, suppressed in FLAIR
# like CSF; a tumour cyst holds protein, so it stays brighter in FLAIR.
EXTRA_CONTRAST = {"cavity": (0.12, 0.15, 0.17, 1.10), "cyst": (0.40, 0.20, 0.22, 1.25)}
# Raw scanner units differ per modality; z-scoring in preparation removes this.
MODALITY_SCALE = (420.0, 780.0, 910.0, 1260.0)
# Canonical label values (0 bg, 1 necrotic core, 2 oedema, 3 enhancing); written as BraTS 2021.
LABEL_NECROTIC, LABEL_EDEMA, LABEL_ENHANCING = 1, 2, 3
# The class of the extra structure some schemes draw (resection cavity, cyst), before relabelling.
LABEL_EXTRA = 4
# The tumours a phantom case holds: adult glioma (the style's), metastases or meningioma.
TUMOURS = ("glioma", "metastases", "meningioma")


@dataclass(frozen=True)
class PhantomScheme:
    """How phantom cases of one label scheme are drawn, named and written.

    Attributes:
        layout: the layout the cases are written in.
        case_id: format string of the case index.
        convention: the label convention of the files.
        tumour: one of :data:`TUMOURS`.
        extra: a structure drawn after the tumour as class 4: "cavity", "cyst", or None.
        relabel: phantom class (0 background, 1 core, 2 oedema, 3 enhancing, 4 extra) -> the scheme's
            class; None keeps them.
        channels: the rendered channels (0 flair, 1 t1, 2 t1ce, 3 t2) the layout's files hold, in order.
    """

    layout: Layout
    case_id: str
    convention: str
    tumour: str = "glioma"
    extra: str | None = None
    relabel: tuple[int, ...] | None = None
    channels: tuple[int, ...] = (0, 1, 2, 3)


def _brats2023(prefix: str, **kwargs) -> PhantomScheme:
    return PhantomScheme(BRATS2023, f"BraTS-{prefix}-{{:05d}}-000", "brats2023", **kwargs)


#: The label schemes phantoms are drawn in (``unet-data synth --scheme``); the first is the default.
PHANTOM_SCHEMES: dict[str, PhantomScheme] = {
    "brats2021": PhantomScheme(BRATS2021, "BraTS2021_{:05d}", "brats2021"),
    "brats2023-gli": _brats2023("GLI"),
    "brats2023-ssa": _brats2023("SSA"),
    "brats2023-ped": _brats2023("PED"),
    "brats2023-men": _brats2023("MEN", tumour="meningioma"),
    "brats2023-met": _brats2023("MET", tumour="metastases"),
    "msd": PhantomScheme(MSD, "BRATS_{:03d}", "msd"),
    "brats2024-gli": PhantomScheme(BRATS2023, "BraTS-GLI-{:05d}-000", "brats2024-gli", extra="cavity"),
    # 2024 pediatric classes: core -> NETC 2, oedema -> ED 4, enhancing -> ET 1, cyst -> CC 3.
    "brats2024-ped": PhantomScheme(
        BRATS2023, "BraTS-PED-{:05d}-000", "brats2024-ped", extra="cyst", relabel=(0, 2, 4, 1, 3)
    ),
    # One T1c image; the mass (core and enhancing) is the gross tumour volume, oedema is outside it.
    "brats-men-rt": PhantomScheme(
        BRATS_MEN_RT,
        "BraTS-MEN-RT-{:04d}-1",
        "brats-men-rt",
        tumour="meningioma",
        relabel=(0, 1, 0, 1, 0),
        channels=(2,),
    ),
}
DEFAULT_PHANTOM_SCHEME = next(iter(PHANTOM_SCHEMES))
# Phantom styles; the first is the default (``data.phantom.style``, ``unet-data synth --style``).
PHANTOM_STYLES = ("brats", "simple")
DEFAULT_STYLE = PHANTOM_STYLES[0]
# brats style: share of tumours with an enhancing rim (BraTS: about three in four), and of cases
# with satellite lesions.
ENHANCING_P = 0.75
SATELLITE_P = 0.3


def make_phantom_case(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    style: str = DEFAULT_STYLE,
    extra: str | None = None,
    tumour: str = "glioma",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom case.

    Args:
        shape: array shape (Z, Y, X) in voxels of 1 mm; each at least 24.
        rng: the random generator (the case is a pure function of its state).
        style: ``"brats"`` (a tumour anywhere in white matter, see the module docstring) or
            ``"simple"`` (one near-centred concentric tumour that always enhances); for glioma.
        extra: also draw, as class 4 with fluid contrast, a resection cavity beside the tumour
            ("cavity", as after surgery) or a cyst inside its core ("cyst"); drawn after
            everything else, so the rest of the case is the one drawn without it.
        tumour: one of :data:`TUMOURS` (:mod:`unet_trainer.data.phantom_tumours`).

    Returns:
        image: float32 (4, Z, Y, X), channels (flair, t1, t1ce, t2), raw positive units, 0 outside the head.
        label: uint8 (Z, Y, X), 0 background, 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing,
        4 the extra structure.

    Raises:
        ValueError: a dimension below 24 voxels (too small to hold a head with a tumour), or an
            unknown style, tumour or extra.
    """
    if style not in PHANTOM_STYLES or tumour not in TUMOURS or extra not in (None, *EXTRA_CONTRAST):
        raise ValueError(f"phantom style {style!r}, tumour {tumour!r} or extra {extra!r} is unknown")
    if min(shape) < 24:
        raise ValueError(f"phantom shape {tuple(shape)} is too small: every dimension must be at least 24")
    shape = tuple(int(s) for s in shape)
    head = _draw_head(shape, rng)
    necrotic, enhancing, edema, core_name, contrast = _tumour(shape, head, rng, style, tumour)
    label = np.zeros(shape, np.uint8)
    label[edema] = LABEL_EDEMA
    label[enhancing] = LABEL_ENHANCING
    label[necrotic] = LABEL_NECROTIC
    tissues = [
        ("scalp", head.head & ~head.skull),
        ("skull", head.skull & ~head.brain),
        ("grey", head.brain & ~head.white),
        ("white", head.white),
        ("csf", head.ventricles | head.sulci),
        ("edema", edema),
        ("enhancing", enhancing),
        (core_name, necrotic),
    ]
    if extra is not None:
        if extra == "cavity":
            mask = resection_cavity(head.grid, head.brain & ~head.ventricles, label > 0, rng)
        else:
            mask = cyst(head.grid, necrotic | enhancing, rng)
        label[mask] = LABEL_EXTRA
        tissues.append((extra, mask))
        contrast = {**contrast, extra: EXTRA_CONTRAST[extra]}
    return _render(shape, tissues, contrast, head.head, rng), label


def _tumour(shape: tuple[int, int, int], head: _Head, rng: np.random.Generator, style: str, tumour: str):
    """The tumour's masks (core, enhancing, oedema), the tissue its core is drawn with, and the contrasts."""
    if tumour == "metastases":
        return (
            *metastases(head.grid, head.white & ~head.ventricles, head.brain & ~head.ventricles, rng),
            "necrotic",
            _case_contrast(rng),
        )
    if tumour == "meningioma":
        return (
            *meningioma(head.grid, head.skull, head.brain & ~head.ventricles, rng),
            "nonenhancing",
            _case_contrast(rng),
        )
    if style == "simple":
        necrotic, enhancing, edema = _simple_tumour(shape, head.grid, head.brain, head.ventricles, head.radius, rng)
        return necrotic, enhancing, edema, "necrotic", TISSUE_CONTRAST
    necrotic, enhancing, edema, core_name = _brats_tumour(
        shape, head.grid, head.brain, head.white, head.ventricles, rng
    )
    return necrotic, enhancing, edema, core_name, _case_contrast(rng)


@dataclass(frozen=True)
class _Head:
    """A phantom head's masks, bool (Z, Y, X), and its voxel grid (3, Z, Y, X); ``radius`` is the
    head's outer radius relative to half the volume."""

    grid: np.ndarray
    head: np.ndarray
    skull: np.ndarray
    brain: np.ndarray
    white: np.ndarray
    ventricles: np.ndarray
    sulci: np.ndarray
    radius: float


def _draw_head(shape: tuple[int, int, int], rng: np.random.Generator) -> _Head:
    """Nested ellipsoids (scalp, skull, brain) with a gently irregular outline; grey and white matter
    from a smooth field; two small ventricles near the centre; sulci."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, np.float32)[:, None, None, None] / 2 + rng.uniform(-1.5, 1.5, (3, 1, 1, 1))
    rel = (grid - centre) / (np.array(shape, np.float32)[:, None, None, None] / 2)
    outline = 0.04 * smooth_field(rng, shape, 4)
    radius = np.sqrt((rel**2).sum(0)) + outline
    head_r = rng.uniform(0.86, 0.92)
    brain = radius < head_r - 0.13
    tissue = smooth_field(rng, shape, 6)
    white = brain & (tissue > rng.uniform(-0.15, 0.15))
    vent_offset = rng.uniform(0.08, 0.14)
    ventricles = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        d = (rel[0] / 0.22) ** 2 + ((rel[1] + 0.05) / 0.30) ** 2 + ((rel[2] - side * vent_offset) / 0.09) ** 2
        ventricles |= d < 1.0
    ventricles &= brain
    sulci = brain & ~white & (np.abs(smooth_field(rng, shape, 10)) < 0.06)
    return _Head(grid, radius < head_r, radius < head_r - 0.07, brain, white, ventricles, sulci, head_r)


def _case_contrast(rng: np.random.Generator) -> dict[str, tuple[float, ...]]:
    """Tumour contrasts vary between patients and scanners: each tumour tissue's deviation from
    white matter scaled per case, so no single intensity threshold finds it."""
    contrast = dict(TISSUE_CONTRAST)
    base = np.array(TISSUE_CONTRAST["white"])
    for name in ("edema", "enhancing", "necrotic", "nonenhancing"):
        contrast[name] = tuple(base + (np.array(TISSUE_CONTRAST[name]) - base) * rng.uniform(0.7, 1.15))
    return contrast


def _render(
    shape: tuple[int, int, int],
    tissues: list[tuple[str, np.ndarray]],
    contrast: dict[str, tuple[float, ...]],
    head: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The four modalities, float32 (4, Z, Y, X): each tissue's contrast (later tissues paint over
    earlier ones), texture within tissues, a smooth multiplicative bias field per modality and noise;
    0 outside the head."""
    image = np.zeros((4,) + shape, np.float32)
    for name, mask in tissues:
        image[:, mask] = np.array(contrast[name], np.float32)[:, None]
    texture = 0.04 * smooth_field(rng, shape, 16)
    for c in range(4):
        bias = 1.0 + 0.12 * smooth_field(rng, shape, 3)
        noise = rng.normal(0.0, 0.035, shape).astype(np.float32)
        channel = (image[c] * (1.0 + texture) * bias + noise) * MODALITY_SCALE[c]
        image[c] = np.where(head, np.clip(channel, 1.0, None), 0.0)
    return image


def _simple_tumour(
    shape: tuple[int, int, int],
    grid: np.ndarray,
    brain: np.ndarray,
    ventricles: np.ndarray,
    head_r: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``simple`` style's tumour masks (necrotic, enhancing, oedema): one lobulated concentric
    ball near the centre, always with an enhancing rim at least ~2 voxels thick."""
    size = float(min(shape))
    edema_r = rng.uniform(0.16, 0.24) * size
    enh_r = edema_r * rng.uniform(0.50, 0.62)
    core_r = enh_r * rng.uniform(0.45, 0.62)
    core_r = min(core_r, enh_r - 2.5)  # keep the enhancing rim at least ~2 voxels thick
    max_offset = (head_r - 0.13) * size / 2 - edema_r * 0.8
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    tumour_centre = np.array(shape, np.float32) / 2 + direction * rng.uniform(0.0, max(max_offset, 0.0))
    dist = np.sqrt(((grid - tumour_centre[:, None, None, None]) ** 2).sum(0))
    lobes = 1.0 + 0.22 * smooth_field(rng, shape, 5)
    dist = dist * lobes
    necrotic = dist < core_r
    enhancing = (dist < enh_r) & ~necrotic
    edema = (dist < edema_r) & ~(necrotic | enhancing)
    # Oedema spreads along white matter; it does not cross into CSF or outside the brain.
    edema &= brain & ~ventricles
    enhancing &= brain
    necrotic &= brain
    return necrotic, enhancing, edema


def _brats_tumour(
    shape: tuple[int, int, int],
    grid: np.ndarray,
    brain: np.ndarray,
    white: np.ndarray,
    ventricles: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The ``brats`` style's tumour masks (core label 1, enhancing, oedema) and the tissue name
    the label-1 voxels are drawn with ("necrotic" inside a rim, "nonenhancing" without one).

    The core is a union of 2-4 overlapping balls (lobes) with a wavy outline, centred on a random
    white-matter voxel deep enough in the brain to hold it; its radius is log-uniform, so small
    tumours are as common as large ones. With probability ENHANCING_P the outer 1-4 voxels of the
    core (the thickness varies around it) enhance and the rest is necrosis; otherwise the whole
    core is non-enhancing tumour (label 1, as BraTS 2021 labels it). Oedema reaches out from the
    core by a distance that varies strongly with direction, mostly along white matter. With
    probability SATELLITE_P one or two small satellite lesions with their own oedema lie nearby.
    """
    size = float(min(shape))
    not_csf = brain & ~ventricles
    depth = ndimage.distance_transform_edt(not_csf)  # voxels to the nearest CSF or non-brain voxel
    core_r = max(float(np.exp(rng.uniform(np.log(0.05), np.log(0.17)))) * size, 2.5)
    # Deep enough that the core fits inside the brain; relaxed for tiny volumes.
    for margin in (core_r + 1.0, core_r * 0.6, 2.0, 0.5):
        where = white & (depth > margin)
        if where.any():
            break
    else:
        where = not_csf
    centre = random_voxel(rng, where)

    # Lobulated core: the main ball plus up to three smaller lobes pushed out in random directions.
    ratio = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / core_r
    for _ in range(int(rng.integers(1, 4))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        lobe_centre = centre + direction * core_r * rng.uniform(0.7, 1.2)
        lobe_r = core_r * rng.uniform(0.4, 0.7)
        ratio = np.minimum(ratio, np.sqrt(((grid - lobe_centre[:, None, None, None]) ** 2).sum(0)) / lobe_r)
    ratio = ratio * (1.0 + 0.25 * smooth_field(rng, shape, 6))
    core = (ratio < 1.0) & not_csf
    if not core.any():  # a lobe field that missed the brain entirely: keep the centre voxel
        core[tuple(centre.astype(int))] = True

    # Enhancing rim of a locally varying thickness (1-4 voxels) around necrosis, or no enhancement.
    enhances = rng.random() < ENHANCING_P
    inner = ndimage.distance_transform_edt(core)  # 1 on the core's outer shell, growing inwards
    thickness = np.clip(rng.uniform(1.0, 4.0) * (1.0 + 0.35 * smooth_field(rng, shape, 5)), 1.0, 4.0)
    if enhances:
        necrotic = core & (inner > thickness)
        enhancing = core & ~necrotic
    else:
        necrotic, enhancing = core, np.zeros(shape, bool)

    # Oedema: uneven reach around the core, ragged at its edge, mostly in white matter.
    outer = ndimage.distance_transform_edt(~core)
    reach = (core_r * rng.uniform(0.4, 1.6) + 1.0) * np.clip(1.0 + 0.8 * smooth_field(rng, shape, 4), 0.1, None)
    reach = reach * (1.0 + 0.25 * smooth_field(rng, shape, 10))
    edema = (outer < reach) & ~core & not_csf & (white | (outer < 0.4 * reach))

    # Satellites: small lesions a short way off, each with a thin oedema halo.
    if rng.random() < SATELLITE_P:
        for _ in range(int(rng.integers(1, 3))):
            near = white & (depth > 2.0) & (outer > 3.0) & (outer < core_r + 0.3 * size)
            if not near.any():
                break
            spot = random_voxel(rng, near)
            dist = np.sqrt(((grid - spot[:, None, None, None]) ** 2).sum(0))
            lesion = (dist < rng.uniform(1.2, 2.6)) & not_csf & ~core
            halo = (dist < rng.uniform(2.5, 5.0)) & not_csf & ~core & ~lesion
            (enhancing if enhances else necrotic)[lesion] = True
            edema |= halo
            edema &= ~lesion
    edema &= ~(necrotic | enhancing)
    return necrotic, enhancing, edema, "necrotic" if enhances else "nonenhancing"


def _write_one_case(
    folder: Path, shape: tuple[int, int, int], seed: int, index: int, style: str, scheme: str = DEFAULT_PHANTOM_SCHEME
) -> str:
    """Draw case ``index`` and write it into ``folder``; returns its id. Runs in a worker process."""
    written = PHANTOM_SCHEMES[scheme]
    rng = np.random.default_rng([seed, index])
    image, label = make_phantom_case(shape, rng, style, extra=written.extra, tumour=written.tumour)
    if written.relabel is not None:
        label = np.asarray(written.relabel, np.uint8)[label]
    case_id = written.case_id.format(index)
    image = image[list(written.channels)]
    write_layout_case(folder, written.layout, case_id, image, label, np.eye(4), written.convention)
    return case_id


def write_phantom_dataset(
    out: Path,
    cases: int,
    shape: tuple[int, int, int],
    seed: int,
    progress: bool = True,
    workers: int = 1,
    style: str = DEFAULT_STYLE,
    scheme: str = DEFAULT_PHANTOM_SCHEME,
) -> list[str]:
    """Write ``cases`` phantom cases of a label scheme under ``out``, in the scheme's layout (the
    BraTS 2021 one by default).

    The dataset is built in a temporary sibling folder and renamed into place when complete,
    so an interrupted run never leaves a half dataset at ``out``.

    Args:
        out: the dataset folder to create (must not exist yet, or be a complete phantom).
        cases: number of cases (>= 1).
        shape: array shape (Z, Y, X) per case; the NIfTI files hold (X, Y, Z).
        seed: case ``i`` is drawn from ``np.random.default_rng([seed, i])``, so the files are the
            same whatever ``workers`` is.
        progress: show a progress bar.
        workers: processes drawing and writing cases in parallel (1: in this process).
        style: one of PHANTOM_STYLES (see :func:`make_phantom_case`).
        scheme: one of :data:`PHANTOM_SCHEMES`.

    Returns:
        The case ids, ``BraTS2021_00000`` onwards (the scheme's pattern).

    Raises:
        FileExistsError: ``out`` exists and is not a complete phantom written with these settings.
        ValueError: an unknown style or scheme.
    """
    if style not in PHANTOM_STYLES:
        raise ValueError(f"phantom style {style!r} is not one of {', '.join(PHANTOM_STYLES)}")
    if scheme not in PHANTOM_SCHEMES:
        raise ValueError(f"phantom scheme {scheme!r} is not one of {', '.join(PHANTOM_SCHEMES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One writer per phantom folder at a time (a second waits, then finds it complete); under the
    # lock, staging folders left by a killed writer are orphans and are removed.
    lock = FolderLock(out.parent, f".{out.name}.lock").acquire(wait=True)
    try:
        staging_name = re.compile(rf"^\.{re.escape(out.name)}-[a-z0-9_]{{8}}$")  # tempfile.mkdtemp's
        for orphan in out.parent.iterdir():
            if staging_name.match(orphan.name) and orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
        return _write_phantom_locked(out, cases, shape, seed, progress, workers, style, scheme)
    finally:
        lock.release()


def _write_phantom_locked(
    out: Path,
    cases: int,
    shape: tuple[int, int, int],
    seed: int,
    progress: bool,
    workers: int,
    style: str,
    scheme: str,
) -> list[str]:
    """:func:`write_phantom_dataset` once ``out`` is locked."""
    settings = {"cases": int(cases), "shape": [int(s) for s in shape], "seed": int(seed), "style": style, "version": 2}
    if scheme != DEFAULT_PHANTOM_SCHEME:  # the default's record stays as it was, so its phantoms stay current
        settings["scheme"] = scheme
    marker = out / "phantom.json"
    if out.exists():
        if marker.is_file() and json.loads(marker.read_text()) == settings:
            return [PHANTOM_SCHEMES[scheme].case_id.format(i) for i in range(cases)]
        raise FileExistsError(f"{out}: exists and is not a phantom written with {settings}; choose another --out")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shape = tuple(int(s) for s in shape)
        bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
        if workers > 1 and cases > 1:
            with worker_pool(min(workers, cases)) as pool:
                futures = [pool.submit(_write_one_case, staging, shape, seed, i, style, scheme) for i in range(cases)]
                for future in as_completed(futures):
                    future.result()  # re-raises a worker's error here
                    bar.update()
            ids = [future.result() for future in futures]
        else:
            ids = []
            for i in range(cases):
                ids.append(_write_one_case(staging, shape, seed, i, style, scheme))
                bar.update()
        bar.close()
        (staging / "phantom.json").write_text(json.dumps(settings))
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ids
