"""The main job end to end on the tiny random backbone: stages, report, resumability."""

import json

from karma.demo import CPU_RECIPE, GPU_RECIPE, demo_config, run_demo, with_overrides


def test_recipe_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n")
    cfg = demo_config(str(path), ["train.batch_size=4"], cuda=False)
    assert cfg.model.lora is True  # from the CPU recipe
    assert (cfg.train.steps, cfg.train.batch_size) == (7, 4)
    gpu, cpu = demo_config(None, [], cuda=True), demo_config(None, [], cuda=False)
    assert gpu.train.steps > cpu.train.steps and gpu.model.lora is False
    assert any(o.startswith("data.query_mode=") for o in CPU_RECIPE)
    assert any(o.startswith("data.query_mode=") for o in GPU_RECIPE)


def test_the_cpu_demo_trains_the_sequence_objective():
    from karma.sequence import check_sequence_config

    for cuda in (False, True):
        cfg = demo_config(None, ["data.query_mode=none", "train.steps=9"], cuda=cuda)
        assert cfg.train.objective == "sequence" and cfg.train.steps == 9  # overrides still win
        check_sequence_config(cfg)  # a recipe the sequence objective accepts
        assert cfg.train.device == ("cuda" if cuda else "cpu")
    search = demo_config(None, [], cuda=False)  # the CPU default: the search setting
    assert search.train.objective == "sequence" and search.data.query_mode == "genre"
    check_sequence_config(search)
    assert demo_config(None, [], cuda=True).train.objective == "prompt"


def test_demo_on_tiny_model_writes_report(tmp_path):
    out = tmp_path / "demo"
    overrides = ["model.backbone=tiny-random", "model.emb_dim=32", "train.steps=3",
                 "train.eval_every=3", "train.save_every=3", "train.eval_users=30",
                 "train.num_threads=1", "train.batch_size=8", "model.freeze_layers=1"]
    run_demo(None, overrides, out_dir=str(out))
    report = (out / "report.md").read_text()
    for name in ("popularity", "action_only", "karma", "hr@10", "ndcg@10", "mrr@10", "tie_break",
                 "query_mode", "Wall time", "Personalization", "other history"):
        assert name in report
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    for preset in ("action_only", "karma"):
        summary = json.loads((out / preset / "train_summary.json").read_text())
        assert (summary["steps"], summary["examples_seen"]) == (3, 24)  # same work for both
        metrics = json.loads((out / preset / "eval" / "metrics.json").read_text())
        assert metrics["protocol"]["users"] == 943 and metrics["protocol"]["catalog_size"] == 1682
    # a second call reuses the finished runs instead of training again
    mtime = (out / "karma" / "train_summary.json").stat().st_mtime
    run_demo(None, overrides, out_dir=str(out))
    assert (out / "karma" / "train_summary.json").stat().st_mtime == mtime


def test_with_overrides_replaces_each_key_once_in_order():
    recipe = ["a=1", "b=2", "c=x=y"]
    assert with_overrides(recipe, "b=9", "d=4") == ["a=1", "c=x=y", "b=9", "d=4"]
    assert with_overrides(recipe) == recipe and recipe == ["a=1", "b=2", "c=x=y"]
