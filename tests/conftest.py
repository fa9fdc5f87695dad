"""Shared fixtures: a tiny phantom and a tiny training config, so end-to-end tests take seconds."""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

from unet_trainer.config.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One cache (phantom + prepared data) shared by the session's training tests."""
    return tmp_path_factory.mktemp("cache")


def tiny_overrides(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that shrink configs/demo.yaml to a few seconds of CPU work."""
    return [
        f"data.cache_dir={cache}",
        f"save_folder={run_dir}",
        "data.phantom.cases=6",
        "data.phantom.shape=[24, 24, 24]",
        "data.num_folds=3",
        "data.patch_size=[16, 16, 16]",
        "data.num_workers=0",
        "data.prepare_workers=1",
        "model.unet.filters=[4, 8]",
        "model.unet.kernel_sizes=[3, 3]",
        "model.unet.strides=[1, 2]",
        "train_batch_size=2",
        "eval_interval=1ep",
        "save_interval=1ba",
        "device=cpu",
        "precision=fp32",
        *extra,
    ]


@pytest.fixture
def tiny_config(cache_root, tmp_path):
    """A function building the resolved tiny config; extra overrides are appended."""

    def build(*extra: str, run_dir: Path | None = None) -> dict:
        return resolve_config(
            ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, run_dir or tmp_path / "run", *extra)
        )

    return build


@contextlib.contextmanager
def script_module(name: str):
    """Import ``scripts/<name>.py`` as module ``name`` for the duration of the block.

    The scripts import their neighbours (benchutil, monai_pipeline, bench_train), so ``scripts/`` is put on
    ``sys.path`` meanwhile; the module is registered in ``sys.modules`` because dataclasses resolve
    their annotations through it. Every module the block imported from ``scripts/`` is dropped
    afterwards, so each test module gets fresh copies.
    """
    scripts = str(ROOT / "scripts")
    before = set(sys.modules)
    sys.path.insert(0, scripts)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        for added in set(sys.modules) - before:
            if (getattr(sys.modules[added], "__file__", None) or "").startswith(scripts):
                sys.modules.pop(added, None)
        sys.path.remove(scripts)


def hide_package(monkeypatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail with ImportError for this test, as if
    the optional package were not installed."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
