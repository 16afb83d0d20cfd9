"""The training objective: KARMA's loss parts over one batch, their weights, the temperature.

    objective = KarmaObjective(model, cfg.loss, rank=dist.rank, world_size=dist.world_size)
    out = objective(batch)        # {"loss", "act_loss", "gen_loss", "rec_loss", ["img_loss"],
                                  #  "temperature"}; under DDP wrap the objective, not the model

Total: loss = act_loss + lambda_gen gen_loss + lambda_rec rec_loss (+ lambda_img img_loss), with
the lambdas of the preset (`karma.losses.loss_weights`). The objective owns what only training
needs: the learnable InfoNCE temperature (karma.losses.ActionLoss) and the token cross-entropy of
L_gen / L_rec. The model (karma/model.py) stays the towers and projections, so inference loads no
loss. Item tower once; user tower once for L_act and L_gen (causal masking keeps <EMB> blind to
the "Next:" tokens); one more pass for L_rec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from karma.batching import history_id_map
from karma.config import ConfigError, LossConfig
from karma.errors import KarmaError
from karma.losses import ActionLoss, CatalogSoftmaxLoss, TokenCrossEntropy, loss_weights
from karma.model import KarmaModel, fill_placeholders


class KarmaObjective(nn.Module):
    """The named losses of a `karma.batching.BatchBuilder` batch for `model`.

    Heads the preset does not train are frozen at construction (R for action_only, g without
    L_img, an untied LM head without L_gen and L_rec): a parameter that gets no gradient would
    break DDP (unused parameters). R stays in the model so analysis can fit it post hoc.
    `rank` / `world_size` set up the cross-rank gather of the InfoNCE candidates.
    """

    def __init__(
        self, model: KarmaModel, cfg: LossConfig, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        self.lambda_gen, self.lambda_rec, self.lambda_img = loss_weights(cfg)
        if self.lambda_img > 0 and model.cfg.model.image_dim <= 0:
            raise ConfigError(
                f"loss.preset={cfg.preset} regresses image features but model.image_dim is 0"
            )
        # Registered before the loss modules, so the temperature comes after every head in the
        # optimizer's head groups, as it did when it lived in the model (same AdamW state order).
        self.model = model
        self.action_loss = ActionLoss(
            cfg.temperature,
            cfg.temperature_min,
            cfg.temperature_max,
            cfg.learn_temperature,
            rank=rank,
            world_size=world_size,
        )
        self.token_loss = TokenCrossEntropy()
        self.catalog_loss = None
        if cfg.catalog_softmax:
            if model.cfg.model.history_source != "cache":
                raise ConfigError(
                    "loss.catalog_softmax scores the cached catalog states: set "
                    "model.history_source=cache"
                )
            self.catalog_loss = CatalogSoftmaxLoss(cfg.catalog_samples)
        self._freeze_unused_heads()

    def _freeze_unused_heads(self) -> None:
        model = self.model
        if self.lambda_rec == 0:
            model.rec_head.requires_grad_(False)
            model.rec_norm.requires_grad_(False)
        if model.cfg.model.image_dim > 0 and self.lambda_img == 0:
            model.image_head.requires_grad_(False)
        lm = model.base_lm
        out = lm.get_output_embeddings()
        tied = out is not None and out.weight is lm.get_input_embeddings().weight
        if out is not None and not tied and self.lambda_gen == 0 and self.lambda_rec == 0:
            out.requires_grad_(False)

    def _history_hidden(
        self, batch: dict[str, torch.Tensor], item_hidden: torch.Tensor
    ) -> torch.Tensor | None:
        """h_i of every history item of the batch, row-major: (n, d), or None (text interface)."""
        model = self.model
        if model.cfg.model.interface != "continuous":
            return None
        if model.cfg.model.history_source == "live":
            index = batch["history_index"]
            return item_hidden[index[index >= 0]]  # (n, d), gradients reach the item tower
        items = batch["history_items"]
        items = items[items >= 0]
        if model.history_cache.shape[0] == 0:
            raise KarmaError(
                "model.history_source=cache but the history cache is empty; call "
                "karma.inference.refresh_history_cache(model, item_texts) first"
            )
        if items.numel() and int(items.max()) >= model.history_cache.shape[0]:
            raise KarmaError(
                f"history item {int(items.max())} outside the history cache of "
                f"{model.history_cache.shape[0]} items"
            )
        return model.history_cache[items]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns `loss`, each part (zeros when off) and `temperature` (detached)."""
        model = self.model
        batch = {k: v.to(model.device) for k, v in batch.items()}
        item_hidden, item_emb = model.encode_items(
            batch["item_input_ids"],
            batch["item_attention_mask"],
            batch.get("item_image_features"),
            item_ids=batch["item_ids"],
        )
        input_ids = batch["user_input_ids"]
        emb = model.user_embeds(input_ids, self._history_hidden(batch, item_hidden))
        history_ids = None
        if "history_positions" in batch:
            history_ids = history_id_map(
                batch["history_items"], batch["history_positions"], input_ids.shape[1]
            )
        hidden = model.run_decoder(emb, batch["user_attention_mask"], history_ids)  # (B,T,d)
        user_emb = model.user_from_hidden(hidden, batch["emb_positions"])  # (B, k)

        n_cand = int(batch["candidate_count"])
        if self.catalog_loss is None:
            out = self.action_loss(
                user_emb, item_emb[:n_cand], batch["positive_index"], batch["item_ids"][:n_cand]
            )
        else:
            # every catalog item is a candidate: cached states through W_e (+ IDs)
            n_items = model.history_cache.shape[0]
            catalog_emb = model.item_embedding(
                model.history_cache, torch.arange(n_items, device=model.device)
            )
            targets = batch["item_ids"][batch["positive_index"]]
            temperature = self.action_loss.temperature
            out = {
                "act_loss": self.catalog_loss(user_emb, catalog_emb, targets, temperature),
                "temperature": temperature.detach(),
            }
        zero = user_emb.new_zeros(())
        lm_head = model.base_lm.get_output_embeddings()
        out["gen_loss"] = zero
        if self.lambda_gen > 0:
            out["gen_loss"] = self.token_loss(hidden, batch["user_labels"], lm_head)
        out["rec_loss"] = zero
        if self.lambda_rec > 0:
            out["rec_loss"] = reconstruction_loss(
                model, user_emb, batch["rec_input_ids"], batch["rec_attention_mask"],
                batch["rec_labels"], self.token_loss,
            )
        loss = out["act_loss"] + self.lambda_gen * out["gen_loss"]
        loss = loss + self.lambda_rec * out["rec_loss"]
        if model.cfg.model.image_dim > 0:
            out["img_loss"] = zero
            if self.lambda_img > 0:
                pred = model.image_head(user_emb).float()  # (B, D)
                # Mean over batch and feature dims of the squared error: scale-free in D.
                out["img_loss"] = F.mse_loss(pred, batch["target_image_features"].float())
            loss = loss + self.lambda_img * out["img_loss"]
        out["loss"] = loss
        return out


def reconstruction_loss(
    model: KarmaModel,
    user_emb: torch.Tensor,
    rec_ids: torch.Tensor,
    rec_mask: torch.Tensor,
    rec_labels: torch.Tensor,
    token_loss: TokenCrossEntropy,
) -> torch.Tensor:
    """L_rec: the target text after R(u) (B, m, d), nothing else visible; gradients reach u.
    rec_ids / rec_mask / rec_labels (B, T) from `PromptFormat.rec`."""
    prefix = model.reconstruction_prefix(user_emb)  # (B, m, d)
    rec_emb = fill_placeholders(
        model.embed_tokens(rec_ids),
        rec_ids,
        model.prompt.rec_id,
        prefix.reshape(-1, prefix.shape[-1]),
        "reconstruction tokens",
    )
    rec_hidden = model.run_decoder(rec_emb, rec_mask)
    return token_loss(rec_hidden, rec_labels, model.base_lm.get_output_embeddings())
