"""Single-process fallbacks, and a 2-rank gloo run of the gathered InfoNCE against one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from karma import distributed
from karma.losses import ActionLoss

WORLD = 2
SIZES = (3, 5)  # candidates per rank: the gather must handle unequal sizes


def _rank_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    user = torch.randn(4, 8, generator=g)
    items = torch.randn(SIZES[rank], 8, generator=g)
    positive = torch.tensor([0, 1, 2, 0]) % SIZES[rank]
    # Rank 1's item 0 has the id of rank 0's item 0: a cross-rank false negative.
    ids = torch.arange(SIZES[rank]) + 10 * rank
    if rank == 1:
        ids[0] = 0
    return user, items, positive, ids


def _single_process():
    users, items, positives, ids = [], [], [], []
    offset = 0
    for r in range(WORLD):
        u, e, p, i = _rank_data(r)
        users.append(u)
        items.append(e)
        positives.append(p + offset)
        ids.append(i)
        offset += SIZES[r]
    user = torch.cat(users).requires_grad_()
    item = torch.cat(items).requires_grad_()
    loss_fn = ActionLoss(temperature=0.1)
    loss = loss_fn(
        F.normalize(user, dim=-1), F.normalize(item, dim=-1), torch.cat(positives), torch.cat(ids)
    )["act_loss"]
    loss.backward()
    return loss.detach(), user.grad, item.grad, loss_fn.log_temperature.grad


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    info = distributed.init_distributed("cpu")
    user, items, positive, ids = _rank_data(rank)
    user.requires_grad_()
    items.requires_grad_()
    loss_fn = ActionLoss(temperature=0.1, rank=info.rank, world_size=info.world_size)
    loss = loss_fn(F.normalize(user, dim=-1), F.normalize(items, dim=-1), positive, ids)["act_loss"]
    loss.backward()
    # What DDP does to parameter gradients: average over ranks.
    temp_grad = distributed.all_reduce_mean(loss_fn.log_temperature.grad)
    mean_loss = distributed.all_reduce_mean(loss.detach())
    torch.save(
        {
            "loss": mean_loss,
            "user_grad": user.grad,
            "item_grad": items.grad,
            "temp_grad": temp_grad,
            "sizes": distributed.gather_sizes(SIZES[rank]),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    distributed.barrier()
    distributed.cleanup()


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert info.device == torch.device("cpu")
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(t) is t
    assert distributed.all_reduce_mean(t) is t
    assert distributed.gather_sizes(3) == [3]


def test_two_rank_gather_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    loss, user_grad, item_grad, temp_grad = _single_process()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert results[0]["sizes"] == list(SIZES)
    assert torch.allclose(results[0]["loss"], loss, atol=1e-6)
    # Rank losses are means over half the batch: their gradients are WORLD times the global mean's.
    got_user = torch.cat([r["user_grad"] for r in results]) / WORLD
    got_item = torch.cat([r["item_grad"] for r in results]) / WORLD
    assert torch.allclose(got_user, user_grad, atol=1e-6)
    assert torch.allclose(got_item, item_grad, atol=1e-6)
    assert item_grad.abs().sum() > 0
    assert torch.allclose(results[0]["temp_grad"], temp_grad, atol=1e-6)


def _ddp_worker(rank: int, init_file: str, out_dir: str, preset: str) -> None:
    import numpy as np
    from torch.nn.parallel import DistributedDataParallel

    from karma.batching import BatchBuilder
    from karma.config import Config
    from karma.model import build_model
    from karma.objective import KarmaObjective

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.backbone = "tiny-random"
    cfg.model.emb_dim = 8
    cfg.loss.preset = preset
    model = build_model(cfg)
    objective = KarmaObjective(model, cfg.loss, rank=rank, world_size=WORLD).train()
    ddp = DistributedDataParallel(objective)

    class Items:
        texts = [f"Fargo {i} | Crime, Drama" for i in range(12)]
        n_items = 12

    class Examples:
        histories = [[1, 2], [3], [4, 5, 6], [7]]
        targets = np.array([8, 9, 10, 11])
        queries = ["crime", "", "drama", ""]
        impressions = [[], [], [], []]

    batch = BatchBuilder(model.tokenizer, Items, cfg, seed=rank)(Examples, [2 * rank, 2 * rank + 1])
    ddp(batch)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    torch.save(grads, os.path.join(out_dir, f"ddp{rank}.pt"))
    distributed.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["action_only", "karma"])
def test_ddp_model_has_no_unused_parameters(tmp_path, preset):
    mp.spawn(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), preset), nprocs=WORLD, join=True
    )
    grads = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
