"""GPU checks (`pytest -m gpu`): the same training loop and inference path on CUDA with bf16.

They skip without CUDA (see conftest.py). These are the repository's only GPU checks: no
full-size GPU run is scripted yet (DESIGN.md section 8 puts such scripts in benchmarks/gpu/).
"""

import json

import pytest
import torch

from karma.config import load_config

pytestmark = pytest.mark.gpu


def _cfg(tmp_path, preset):
    return load_config("configs/debug.yaml", [
        f"loss.preset={preset}", f"train.output_dir={tmp_path / preset}", "train.device=cuda",
        "train.bf16=true", "train.steps=6", "train.eval_every=6", "train.save_every=6",
        "train.eval_users=50", f"data.prepared_dir={tmp_path / 'data'}",
    ])


@pytest.mark.parametrize("preset", ["action_only", "karma"])
def test_train_on_cuda_bf16_is_finite(tmp_path, preset):
    from karma.train import train

    run_dir = train(_cfg(tmp_path, preset))
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final_losses"].values())


def test_cuda_and_cpu_user_embeddings_agree(tmp_path):
    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.inference import encode_catalog, encode_users
    from karma.train import train

    run_dir = train(_cfg(tmp_path, "karma"))
    cfg = _cfg(tmp_path, "karma")
    data = load_prepared(cfg.data.prepared_dir)
    valid = data.split("valid")
    embs = []
    for device in ("cpu", "cuda"):
        model, _ = load_model(run_dir / "checkpoints" / "last", device=device)
        catalog = encode_catalog(model, data.items.texts, batch_size=64, progress=False)
        embs.append(encode_users(model, valid.histories[:32], valid.queries[:32], catalog,
                                 data.items.texts, batch_size=16).float().cpu())
    assert torch.allclose(embs[0], embs[1], atol=2e-3)
