"""The image path from the CLI: `karma shop` -> `karma data prepare` -> `karma train
loss.preset=karma_mm` on the debug model, then eval, export, analyze and serve of that checkpoint,
and the errors of the combinations that cannot work. A tiny shop with small generated pictures
stands in for Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from karma.checkpoint import load_model
from karma.cli import main
from karma.config import load_config
from karma.data import load_image_features, load_prepared
from karma.datasets.shop import ShopConfig, generate_shop, synthetic_pictures
from karma.errors import KarmaError
from karma.images import IMAGE_DIM
from karma.inference import encode_catalog

DEBUG = str(Path(__file__).parents[1] / "configs" / "debug.yaml")


def _shop_args(shop: Path, prepared: Path) -> list[str]:
    return ["data.source=shop", f"data.path={shop}", f"data.prepared_dir={prepared}"]


def test_train_karma_mm_takes_the_image_width_and_trains_l_img(mm_run):
    run = mm_run["run"]
    saved = yaml.safe_load((run / "checkpoints" / "best" / "config.yaml").read_text())
    assert saved["model"]["image_dim"] == IMAGE_DIM and saved["loss"]["preset"] == "karma_mm"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["img_loss"] > 0 for r in log if "img_loss" in r) and "img_loss" in log[0]
    assert "val/hr@10" in log[-1] and "monitor/sink_rate_first" in log[-1]


def test_the_image_token_changes_the_item_embeddings(mm_run):
    """The catalog is encoded with the stored features: other features give other e_i."""
    model, cfg = load_model(mm_run["run"] / "checkpoints" / "best", device="cpu")
    data = load_prepared(mm_run["prepared"])
    feats = load_image_features(mm_run["prepared"])
    texts = data.items.texts[:6]
    with_images = encode_catalog(model, texts, image_features=feats[:6], progress=False)
    shuffled = encode_catalog(model, texts, image_features=feats[[1, 2, 3, 4, 5, 0]],
                              progress=False)  # fmt: skip
    assert not torch.allclose(with_images.item_emb, shuffled.item_emb, atol=1e-4)
    with pytest.raises(KarmaError, match="pass image_features"):
        encode_catalog(model, texts, progress=False)


def test_eval_and_export_of_a_karma_mm_checkpoint(mm_run, tmp_path):
    ckpt = mm_run["run"] / "checkpoints" / "best"
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eval"),
                 "eval.cold_threshold=1"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["protocol"]["loss_preset"] == "karma_mm"
    assert 0 <= metrics["metrics"]["masked"]["hr@10"] <= 1
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export"),
                 "--format", "npy"]) == 0  # fmt: skip
    item_emb = np.load(tmp_path / "export" / "item_emb.npy")
    # the exported catalog is the one encoded with the images
    model, _ = load_model(ckpt, device="cpu")
    data = load_prepared(mm_run["prepared"])
    expected = encode_catalog(model, data.items.texts, image_features=load_image_features(
        mm_run["prepared"]), progress=False).item_emb.numpy()  # fmt: skip
    np.testing.assert_allclose(item_emb, expected, atol=1e-5)


def test_analyze_a_karma_mm_checkpoint(mm_run, tmp_path):
    ckpt = mm_run["run"] / "checkpoints" / "best"
    assert main(["analyze", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"),
                 "analysis.probe_users=5", "analysis.max_new_tokens=4"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())[0]
    assert result["preset"] == "karma_mm" and result["probe_users"] == 5
    assert 1 <= result["fidelity"]["text_query_rank_median"] <= 40


def test_serve_encodes_the_catalog_with_its_images(mm_run):
    from karma.serve import Service

    ckpt = mm_run["run"] / "checkpoints" / "best"
    service = Service(load_config(None, [f"serve.checkpoint={ckpt}"]))
    try:
        model, _ = load_model(ckpt, device="cpu")
        data = load_prepared(mm_run["prepared"])
        expected = encode_catalog(model, data.items.texts, image_features=load_image_features(
            mm_run["prepared"]), progress=False).item_emb  # fmt: skip
        assert torch.allclose(service.catalog.item_emb, expected, atol=1e-5)
    finally:
        service.close()


def test_late_image_fusion_from_the_cli_trains_evaluates_and_serves(mm_run, tmp_path):
    """model.image_fusion=late with the prompt objective: the late maps train, and eval and
    serve hand the catalog's features to the model (history items look them up there)."""
    from karma.serve import Service

    run = tmp_path / "late"
    assert main(["train", "--config", DEBUG, *_shop_args(mm_run["shop"], mm_run["prepared"]),
                 "loss.preset=karma_mm", "model.image_fusion=late", "train.steps=2",
                 "train.eval_every=2", "train.save_every=2", "train.eval_users=20",
                 f"train.output_dir={run}"]) == 0  # fmt: skip
    ckpt = run / "checkpoints" / "best"
    model, _ = load_model(ckpt, device="cpu")
    assert not hasattr(model, "image_proj") and model.image_item[1].weight.abs().sum() > 0
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["metrics"]["masked"]["hr@10"] <= 1
    service = Service(load_config(None, [f"serve.checkpoint={ckpt}"]))
    try:
        feats = load_image_features(mm_run["prepared"])
        torch.testing.assert_close(service.model.image_table, torch.as_tensor(feats))
        expected = encode_catalog(model, load_prepared(mm_run["prepared"]).items.texts,
                                  image_features=feats, progress=False).item_emb  # fmt: skip
        assert torch.allclose(service.catalog.item_emb, expected, atol=1e-5)
    finally:
        service.close()


def test_karma_mm_on_a_dataset_without_images_is_a_clear_error(tmp_path, capsys):
    shop, prepared = tmp_path / "shop", tmp_path / "prepared"
    generate_shop(ShopConfig(items=30, users=100, images=False), shop,
                  pictures=synthetic_pictures())  # fmt: skip
    code = main(["train", "--config", DEBUG, *_shop_args(shop, prepared), "loss.preset=karma_mm",
                 "train.steps=1", f"train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "loss.preset=karma_mm reads item images" in err and str(prepared) in err


def test_a_karma_mm_checkpoint_on_a_text_only_dataset_names_the_dataset(mm_run, tmp_path, capsys):
    shop, prepared = tmp_path / "shop", tmp_path / "prepared"
    generate_shop(ShopConfig(items=30, users=100, images=False), shop,
                  pictures=synthetic_pictures())  # fmt: skip
    assert main(["data", "prepare", "--config", DEBUG, *_shop_args(shop, prepared)]) == 0
    code = main(["eval", "--checkpoint", str(mm_run["run"] / "checkpoints" / "best"),
                 "--out", str(tmp_path / "e"), f"data.prepared_dir={prepared}",
                 f"data.path={shop}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "image_features.npy" in err and "model.image_dim=1280" in err


def test_sequence_objective_takes_images():
    """karma_mm trains with the sequence objective too (tests/test_sequence.py runs it)."""
    from karma.sequence import check_sequence_config

    cfg = load_config(DEBUG, ["train.objective=sequence", "loss.preset=karma_mm",
                              "model.image_dim=1280", "data.query_mode=none",
                              "model.readout=history", "model.history_source=cache",
                              "model.lora=true", "model.train_item_tower=false"])  # fmt: skip
    check_sequence_config(cfg)
