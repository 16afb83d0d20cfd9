"""ActionLoss vs a plain-loop InfoNCE, false-negative masking, temperature, presets, token CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from karma.config import ConfigError, LossConfig
from karma.losses import ActionLoss, TokenCrossEntropy, loss_weights


def _reference_infonce(user_emb, item_emb, positive_index, item_ids, temperature):
    """-log softmax over candidates, one user at a time, skipping duplicates of the positive."""
    losses = []
    for b in range(user_emb.shape[0]):
        p = int(positive_index[b])
        pos = math.exp(float(user_emb[b] @ item_emb[p]) / temperature)
        denom = 0.0
        for c in range(item_emb.shape[0]):
            if c != p and int(item_ids[c]) == int(item_ids[p]):
                continue
            denom += math.exp(float(user_emb[b] @ item_emb[c]) / temperature)
        losses.append(-math.log(pos / denom))
    return sum(losses) / len(losses)


def _data(seed=0, batch=5, candidates=9, k=8):
    g = torch.Generator().manual_seed(seed)
    user_emb = F.normalize(torch.randn(batch, k, generator=g), dim=-1)
    item_emb = F.normalize(torch.randn(candidates, k, generator=g), dim=-1)
    # Candidate 1 and 6 are the same item (id 3): a false negative for users whose positive is 1.
    item_ids = torch.tensor([0, 3, 5, 7, 9, 11, 3, 13, 15])[:candidates]
    positive_index = torch.tensor([0, 1, 2, 1, 4])[:batch]
    return user_emb, item_emb, positive_index, item_ids


def test_action_loss_matches_plain_loop():
    user_emb, item_emb, positive_index, item_ids = _data()
    loss_fn = ActionLoss(temperature=0.1)
    out = loss_fn(user_emb, item_emb, positive_index, item_ids)
    ref = _reference_infonce(user_emb, item_emb, positive_index, item_ids, 0.1)
    assert out["act_loss"].item() == pytest.approx(ref, rel=1e-5)
    assert out["temperature"].item() == pytest.approx(0.1, rel=1e-6)
    assert not out["temperature"].requires_grad


def test_false_negatives_are_masked():
    user_emb, item_emb, positive_index, item_ids = _data()
    loss_fn = ActionLoss(temperature=0.1)
    masked = loss_fn(user_emb, item_emb, positive_index, item_ids)["act_loss"]
    # Dropping the duplicate column (6) must not change the loss of the users whose positive is 1;
    # it changes the others' denominators, so compare on users 1 and 3 only.
    keep = [0, 1, 2, 3, 4, 5, 7, 8]
    sub = loss_fn(user_emb[[1, 3]], item_emb[keep], positive_index[[1, 3]], item_ids[keep])
    full = loss_fn(user_emb[[1, 3]], item_emb, positive_index[[1, 3]], item_ids)
    assert full["act_loss"].item() == pytest.approx(sub["act_loss"].item(), rel=1e-6)
    # Without masking (distinct ids) the duplicate would count as a negative: a larger loss.
    distinct = torch.arange(item_ids.shape[0])
    unmasked = loss_fn(user_emb[[1, 3]], item_emb, positive_index[[1, 3]], distinct)
    assert unmasked["act_loss"].item() > full["act_loss"].item()
    assert torch.isfinite(masked)


def test_temperature_is_learnable_and_clamped():
    user_emb, item_emb, positive_index, item_ids = _data()
    loss_fn = ActionLoss(temperature=0.05, temperature_min=0.01, temperature_max=0.5)
    loss_fn(user_emb, item_emb, positive_index, item_ids)["act_loss"].backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad != 0
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(10.0))
    assert loss_fn.temperature.item() == pytest.approx(0.5, rel=1e-6)
    fixed = ActionLoss(temperature=0.05, learn_temperature=False)
    assert not any(True for _ in fixed.parameters())
    with pytest.raises(ConfigError):
        ActionLoss(temperature=2.0, temperature_max=1.0)


def test_loss_weights_presets():
    cfg = LossConfig(lambda_gen=0.3, lambda_rec=0.7, lambda_img=0.2)
    expected = {
        "action_only": (0, 0, 0),
        "gen": (0.3, 0, 0),
        "rec": (0, 0.7, 0),
        "karma": (0.3, 0.7, 0),
        "karma_mm": (0.3, 0.7, 0.2),
    }
    for preset, weights in expected.items():
        cfg.preset = preset
        assert loss_weights(cfg) == pytest.approx(weights)
    cfg.preset = "karmaa"
    with pytest.raises(ConfigError, match="loss.preset"):
        loss_weights(cfg)


def test_token_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(3, 5, 6)
    labels = torch.full((3, 5), -100)
    labels[0, 2:] = torch.tensor([1, 2, 3])
    labels[2, 4] = 7
    loss = TokenCrossEntropy()(hidden, labels, head)
    logits = head(hidden)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    none = TokenCrossEntropy()(hidden, torch.full((3, 5), -100), head)
    assert none.item() == 0.0


def test_catalog_softmax_full_matches_plain_loop():
    from karma.losses import CatalogSoftmaxLoss

    torch.manual_seed(0)
    user = F.normalize(torch.randn(5, 8), dim=-1)
    items = F.normalize(torch.randn(12, 8), dim=-1)
    targets = torch.tensor([0, 3, 3, 11, 7])
    tau = torch.tensor(0.1)
    plain = []
    for r in range(5):
        logits = [float(user[r] @ items[j]) / 0.1 for j in range(12)]
        plain.append(-logits[int(targets[r])] + math.log(sum(math.exp(v) for v in logits)))
    got = CatalogSoftmaxLoss(sampled=0)(user, items, targets, tau)
    assert got.item() == pytest.approx(sum(plain) / 5, rel=1e-5)


def test_catalog_softmax_sampled_is_logq_corrected_and_masks_hits():
    from karma.losses import CatalogSoftmaxLoss

    torch.manual_seed(0)
    user = F.normalize(torch.randn(4, 8), dim=-1)
    items = F.normalize(torch.randn(50, 8), dim=-1)
    targets = torch.tensor([1, 2, 3, 4])
    tau = torch.tensor(0.2)
    freq = torch.arange(1, 51).float()

    def grad(loss_fn):
        u = user.clone().requires_grad_(True)
        loss_fn(u).backward()
        return u.grad.flatten()

    full = grad(lambda u: CatalogSoftmaxLoss(sampled=0)(u, items, targets, tau))
    corrected = CatalogSoftmaxLoss(sampled=20000, proposal=freq)
    gen = torch.Generator().manual_seed(0)
    sampled = grad(lambda u: corrected(u, items, targets, tau, generator=gen))
    # the logQ-corrected sampled gradient estimates the full-catalog gradient
    assert F.cosine_similarity(sampled, full, dim=0) > 0.999
    assert torch.allclose(sampled, full, rtol=0.1, atol=0.01)
    # a sampled copy of a target never counts as its own negative
    only_target = CatalogSoftmaxLoss(sampled=3, proposal=torch.eye(50)[1])
    out = only_target(user[:1], items, targets[:1], tau)
    assert out.item() == pytest.approx(0.0, abs=1e-6)
