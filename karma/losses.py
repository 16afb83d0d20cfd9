"""The three KARMA losses as small modules over embeddings and hidden states, plus the presets.

    act = ActionLoss(temperature=0.05, rank=dist_info.rank, world_size=dist_info.world_size)
    out = act(user_emb, item_emb, positive_index, item_ids)   # {"act_loss", "temperature"}
    gen_loss = TokenCrossEntropy()(hidden_states, labels, lm_head)
    cat = CatalogSoftmaxLoss(sampled=0)(user_emb, catalog_emb, targets, temperature)  # full catalog
    lambda_gen, lambda_rec, lambda_img = loss_weights(cfg.loss)

Total: L = act_loss + lambda_gen * gen_loss + lambda_rec * rec_loss (+ lambda_img * img_loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from karma.config import ConfigError, LossConfig
from karma.distributed import gather_no_grad, gather_sizes, gather_with_grad

PRESETS = ("action_only", "gen", "rec", "karma", "karma_mm")


def loss_weights(cfg: LossConfig) -> tuple[float, float, float]:
    """(lambda_gen, lambda_rec, lambda_img) of a preset; the lambdas come from `cfg`.

    action_only: (0, 0, 0)   gen: (lambda_gen, 0, 0)   rec: (0, lambda_rec, 0)
    karma: (lambda_gen, lambda_rec, 0)   karma_mm: (lambda_gen, lambda_rec, lambda_img)
    """
    presets = {
        "action_only": (0.0, 0.0, 0.0),
        "gen": (cfg.lambda_gen, 0.0, 0.0),
        "rec": (0.0, cfg.lambda_rec, 0.0),
        "karma": (cfg.lambda_gen, cfg.lambda_rec, 0.0),
        "karma_mm": (cfg.lambda_gen, cfg.lambda_rec, cfg.lambda_img),
    }
    if cfg.preset not in presets:
        raise ConfigError(
            f"config key 'loss.preset': unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)})"
        )
    return presets[cfg.preset]


class ActionLoss(nn.Module):
    """InfoNCE over the batch's candidate items, with a learnable clamped temperature.

    For user b with positive candidate p_b:

        act_loss = mean_b  -log  exp(u_b . e_{p_b} / tau) / sum_{c not masked} exp(u_b . e_c / tau)

    Candidates c are every item embedded in the batch on every rank (in-batch targets of other
    users, hard negatives, sampled negatives). Candidates whose item id equals the positive's id,
    other than the positive itself, are masked: they are false negatives (two users of the batch
    clicked the same item). tau = exp(log_tau) clamped to [temperature_min, temperature_max].

    Inputs: user_emb (B, k) and item_emb (C, k), both L2-normalized; positive_index (B,) in
    [0, C) into this rank's candidates; item_ids (C,) global item indices. Under DDP (world_size >
    1) the candidates of all ranks are gathered with gradient and positive_index is offset by the
    number of candidates on lower ranks.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        temperature_min: float = 0.01,
        temperature_max: float = 1.0,
        learn_temperature: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < temperature_min <= temperature <= temperature_max:
            raise ConfigError(
                "config keys 'loss.temperature*': need 0 < temperature_min <= "
                f"temperature <= temperature_max, got {temperature_min}, "
                f"{temperature}, {temperature_max}"
            )
        log_tau = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        self.log_min = math.log(temperature_min)
        self.log_max = math.log(temperature_max)
        self.rank = rank
        self.world_size = world_size

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.clamp(self.log_min, self.log_max).exp()

    def forward(
        self,
        user_emb: torch.Tensor,
        item_emb: torch.Tensor,
        positive_index: torch.Tensor,
        item_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        offset = 0
        if self.world_size > 1:
            sizes = gather_sizes(item_emb.shape[0], item_emb.device)
            offset = sum(sizes[: self.rank])
            item_emb = gather_with_grad(item_emb, sizes)  # (C_all, k)
            item_ids = gather_no_grad(item_ids, sizes)  # (C_all,)
        labels = positive_index + offset  # (B,)
        temperature = self.temperature
        # Logits in float32 even under bf16 autocast: scores are divided by tau ~ 0.05.
        with torch.autocast(device_type=user_emb.device.type, enabled=False):
            logits = user_emb.float() @ item_emb.float().T / temperature.float()  # (B, C_all)
        positive_ids = item_ids[labels]  # (B,)
        false_negative = item_ids[None, :] == positive_ids[:, None]  # (B, C_all)
        false_negative[torch.arange(labels.shape[0], device=labels.device), labels] = False
        logits = logits.masked_fill(false_negative, float("-inf"))
        act_loss = F.cross_entropy(logits, labels)
        return {"act_loss": act_loss, "temperature": temperature.detach()}


class TokenCrossEntropy(nn.Module):
    """Next-token cross-entropy, mean over target tokens, computed only where labels are set.

        loss = mean_{(b, t): labels[b, t+1] != -100}  -log softmax(lm_head(h[b, t]))[labels[b, t+1]]

    Inputs: hidden_states (B, T, d) (the decoder's last hidden states), labels (B, T) aligned
    with the inputs as in Hugging Face (-100 = ignored; the shift happens here) and the LM head.
    Projecting only the labelled positions avoids materializing (B, T, vocab) logits.
    """

    def forward(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module
    ) -> torch.Tensor:
        nll, _ = self.token_nll(hidden_states, labels, lm_head)
        if nll.numel() == 0:
            return hidden_states.sum() * 0.0
        return nll.mean()

    @staticmethod
    def token_nll(
        hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p of each labelled token, (N,), and the batch row of each, (N,): what the mean
        reduces, kept apart for per-example scores (karma.analysis.fidelity)."""
        shift_labels = labels[:, 1:]  # (B, T-1)
        keep = shift_labels != -100
        hidden = hidden_states[:, :-1][keep]  # (N, d)
        logits = lm_head(hidden).float()  # (N, vocab)
        nll = F.cross_entropy(logits, shift_labels[keep], reduction="none")
        return nll, keep.nonzero()[:, 0]


class CatalogSoftmaxLoss(nn.Module):
    """Softmax over the whole catalog, or over a sampled part of it with the logQ correction.

    Full (`sampled=0`), for readout r with target t_r and temperature tau:

        catalog_loss = mean_r -log exp(u_r . e_{t_r} / tau) / sum_j exp(u_r . e_j / tau)

    Sampled (`sampled=S > 0`): S candidates j_1..j_S are drawn with replacement from the proposal
    q (uniform when `proposal` is None, e.g. item frequency otherwise) and shared by the batch;
    every logit, the target's included, is corrected by -log(S q_j) (sampled softmax, Jean et al.
    2015; Yi et al. 2019 for retrieval), which makes the sampled loss a consistent estimate of the
    full one, and a sampled copy of the target itself is masked (an accidental hit). This is what
    lets the same objective scale to catalogs of millions of items.

    Inputs: user_emb (R, k) and item_emb (N, k) L2-normalized (item_emb is the whole catalog, with
    gradient to whatever produced it), targets (R,) in [0, N), temperature a scalar tensor.
    Logits are computed in float32 (tau ~ 0.05).
    """

    def __init__(self, sampled: int = 0, proposal: torch.Tensor | None = None) -> None:
        super().__init__()
        if sampled < 0:
            raise ConfigError(f"config key 'loss.catalog_negatives': {sampled} < 0")
        self.sampled = sampled
        if proposal is not None:
            proposal = proposal.double() / proposal.double().sum()
        self.register_buffer("proposal", proposal, persistent=False)

    def forward(
        self,
        user_emb: torch.Tensor,
        item_emb: torch.Tensor,
        targets: torch.Tensor,
        temperature: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        with torch.autocast(device_type=user_emb.device.type, enabled=False):
            user, items, tau = user_emb.float(), item_emb.float(), temperature.float()
            if self.sampled == 0:
                return F.cross_entropy(user @ items.T / tau, targets)
            n = items.shape[0]
            q = self.proposal
            if q is None:
                q = torch.full((n,), 1.0 / n, dtype=torch.float64)
            sample = torch.multinomial(q.cpu(), self.sampled, replacement=True, generator=generator)
            sample = sample.to(items.device)
            log_sq = torch.log(self.sampled * q.to(items.device)).float()  # (N,)
            pos = (user * items[targets]).sum(-1) / tau - log_sq[targets]  # (R,)
            neg = user @ items[sample].T / tau - log_sq[sample][None, :]  # (R, S)
            neg = neg.masked_fill(sample[None, :] == targets[:, None], float("-inf"))
            logits = torch.cat([pos[:, None], neg], dim=1)  # (R, 1 + S)
            return F.cross_entropy(logits, torch.zeros_like(targets))


def candidates_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Softmax over each row's own candidates: the catalog logits u_r . e_j / tau with every item
    outside allowed[r] removed. user_emb (R, k), item_emb (N, k), targets (R,), allowed (R, N)
    bool with allowed[r, targets[r]] true. The query's candidate set as hard negatives: the
    loss ranks the target among the items a filter on the query would keep."""
    with torch.autocast(device_type=user_emb.device.type, enabled=False):
        logits = user_emb.float() @ item_emb.float().T / temperature.float()
        return F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), targets)
