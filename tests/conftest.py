"""Shared pytest fixtures: a tiny random backbone and an isolated `$KARMA_HOME`.

def test_something(tiny_backbone):
    model, tokenizer = tiny_backbone      # fresh 2-layer Llama + 1000-token BPE, seeded

def test_cache(tmp_karma_home):           # KARMA_HOME points at a fresh tmp dir
    ...

def test_serving(debug_checkpoint):       # configs/debug.yaml trained 2 steps (once a session)
    ...

def test_images(mm_run):                  # a tiny shop with pictures, karma_mm trained 4 steps
    mm_run["run"] / "checkpoints" / "best"
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tmp_karma_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point `$KARMA_HOME` at an empty temporary directory for the test."""
    home = tmp_path / "karma_home"
    home.mkdir()
    monkeypatch.setenv("KARMA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def debug_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`checkpoints/last` of configs/debug.yaml (real ML-100K, tiny random backbone) after 2
    training steps; the prepared data lives beside it."""
    from karma.config import load_config
    from karma.train import train

    root = tmp_path_factory.mktemp("debug_run")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "debug.yaml", [
        "train.steps=2", "train.eval_every=0", "train.save_every=2", "train.log_every=1",
        f"train.output_dir={root / 'run'}", f"data.prepared_dir={root / 'data'}",
    ])
    train(cfg)
    return root / "run" / "checkpoints" / "last"


@pytest.fixture(scope="session")
def mm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny shop (40 items, 100 users, generated pictures), prepared, and karma_mm trained on
    it with the debug model for 4 steps: {root, shop, prepared, run}."""
    from karma.cli import main

    debug = str(Path(__file__).parents[1] / "configs" / "debug.yaml")
    root = tmp_path_factory.mktemp("mm")
    shop, prepared, run = root / "shop", root / "prepared", root / "run"
    assert main(["shop", "--items", "40", "--users", "100", "--out", str(shop),
                 "--pictures", "synthetic"]) == 0  # fmt: skip
    data_args = ["data.source=shop", f"data.path={shop}", f"data.prepared_dir={prepared}"]
    assert main(["data", "prepare", "--config", debug, *data_args]) == 0
    assert main(["train", "--config", debug, *data_args, "loss.preset=karma_mm",
                 "train.steps=4", "train.eval_every=4", "train.save_every=4",
                 "train.log_every=2", "train.eval_users=20", "train.monitor_every=4",
                 f"train.output_dir={run}"]) == 0  # fmt: skip
    return {"root": root, "shop": shop, "prepared": prepared, "run": run}


@pytest.fixture(scope="session")
def serve_service(debug_checkpoint: Path):
    """A `karma.serve.Service` over `debug_checkpoint` (model, catalog, index, worker thread),
    shared by the API and browser tests; each test builds its own app (limits, token) on it."""
    from karma.config import load_config
    from karma.serve import Service

    service = Service(load_config(None, [f"serve.checkpoint={debug_checkpoint}"]))
    yield service
    service.close()


@pytest.fixture
def tiny_backbone():
    """A fresh (model, tokenizer) pair from `load_backbone("tiny-random")` (fast, seeded)."""
    from karma.backbones import load_backbone

    return load_backbone("tiny-random")


@pytest.fixture
def tiny_tokenizer():
    """The tiny-random tokenizer alone (byte-level BPE, vocab 1000, SmolLM2 special tokens)."""
    from karma.backbones import build_tiny_tokenizer

    return build_tiny_tokenizer()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` tests skip cleanly on machines without CUDA (CI, laptops)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
