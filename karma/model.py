"""KarmaModel: a Hugging Face causal LM wrapped as an item tower and a user tower, plus heads.

    model = build_model(cfg)                        # backbone from karma.backbones.load_backbone
    out = model.compute_losses(batch)               # {"loss", "act_loss", "gen_loss", ...}
    # under DDP call the wrapper instead, so gradients sync: ddp_model(batch) == compute_losses
    catalog = model.encode_catalog(item_texts)      # item_emb (N, k), item_hidden (N, d)
    user_emb = model.encode_users(histories, queries, catalog, item_texts)   # (B, k)

Item tower: `<bos> [<IMG>] text <ITEM>`; h_i = last hidden state at <ITEM>;
e_i = normalize(W_e h_i).
User tower (continuous): `<bos> Query: q History: x_1 .. x_n <EMB>` through inputs_embeds with
x_i = P_h(h_i) one input embedding per history item; u = normalize(W_u h_<EMB>). The `text`
interface writes the history items out instead. Train-only heads: R (u -> m soft tokens for
L_rec), g (u -> image feature for L_img). Layouts are in karma/batching.py, losses in
karma/losses.py. The learnable <ITEM>/<EMB> input embeddings live in `special_embeds`, outside
the (possibly frozen or LoRA-wrapped) embedding matrix, so they always train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from karma.batching import (
    PromptFormat,
    add_special_tokens,
    pad_sequences,
)
from karma.config import Config, ConfigError
from karma.distributed import gather_no_grad
from karma.errors import KarmaError
from karma.losses import ActionLoss, TokenCrossEntropy, loss_weights

WEIGHTS_NAME = "model.safetensors"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class CatalogEncoding:
    """Item tower outputs for a catalog, float32 on CPU, rows in item_idx order."""

    item_emb: torch.Tensor  # (N, k) L2-normalized e_i
    item_hidden: torch.Tensor  # (N, d) h_i, the input of P_h for history tokens


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)"""
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * t).argmax(-1)


def _scaled_rmsnorm(d: int, rms: float) -> nn.RMSNorm:
    # Soft input tokens are normalized to the RMS of the token embeddings, so that they enter the
    # LLM on the scale it was trained on (last hidden states are far larger than embeddings).
    norm = nn.RMSNorm(d, eps=1e-6)
    nn.init.constant_(norm.weight, rms)
    return norm


class KarmaModel(nn.Module):
    def __init__(
        self, backbone: nn.Module, tokenizer: Any, cfg: Config, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        mcfg = cfg.model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.lambda_gen, self.lambda_rec, self.lambda_img = loss_weights(cfg.loss)
        if mcfg.interface not in ("continuous", "text"):
            raise ConfigError(
                f"config key 'model.interface': expected continuous or text, got {mcfg.interface!r}"
            )
        if mcfg.history_source not in ("live", "cache"):
            raise ConfigError(
                f"config key 'model.history_source': expected live or cache, got "
                f"{mcfg.history_source!r}"
            )
        if self.lambda_img > 0 and mcfg.image_dim <= 0:
            raise ConfigError(
                f"loss.preset={cfg.loss.preset} regresses image features but model.image_dim is 0"
            )
        if mcfg.rec_tokens < 1:
            raise ConfigError("config key 'model.rec_tokens': must be >= 1")

        add_special_tokens(tokenizer)
        if len(tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
            # New rows are placeholders only: <ITEM>/<EMB> use `special_embeds`, the other
            # special tokens are always replaced by soft vectors.
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        backbone.config.use_cache = False
        self.prompt = PromptFormat(tokenizer, mcfg)

        token_emb = backbone.get_input_embeddings().weight.detach()
        d = token_emb.shape[1]
        k = mcfg.emb_dim
        emb_rms = float(token_emb.float().pow(2).mean().sqrt())
        self.hidden_size = d
        # <ITEM>, <EMB>: start from the mean token embedding plus small distinct noise.
        special = token_emb.float().mean(0, keepdim=True).repeat(2, 1)
        special = special + 0.1 * emb_rms * torch.randn_like(special)
        self.special_embeds = nn.Parameter(special)  # (2, d)

        self.item_proj = nn.Linear(d, k)  # W_e
        self.user_proj = nn.Linear(d, k)  # W_u
        if mcfg.interface == "continuous":
            lin = nn.Linear(d, d)
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.history_proj = nn.Sequential(lin, _scaled_rmsnorm(d, emb_rms))  # P_h
        m = mcfg.rec_tokens
        self.rec_head = nn.Sequential(nn.Linear(k, d), nn.GELU(), nn.Linear(d, m * d))  # R
        self.rec_norm = _scaled_rmsnorm(d, emb_rms)
        if mcfg.image_dim > 0:
            self.image_proj = nn.Sequential(
                nn.Linear(mcfg.image_dim, d),
                nn.GELU(),
                nn.Linear(d, d),
                _scaled_rmsnorm(d, emb_rms),
            )
            self.image_head = nn.Sequential(
                nn.Linear(k, d), nn.GELU(), nn.Linear(d, mcfg.image_dim)
            )  # g
        self.action_loss = ActionLoss(
            cfg.loss.temperature,
            cfg.loss.temperature_min,
            cfg.loss.temperature_max,
            cfg.loss.learn_temperature,
            rank=rank,
            world_size=world_size,
        )
        self.token_loss = TokenCrossEntropy()
        # h_i of every item for history_source=cache; empty until refresh_history_cache().
        self.register_buffer("history_cache", torch.zeros(0, d))
        self.register_load_state_dict_pre_hook(_resize_history_cache)

        self.backbone = self._prepare_backbone(backbone)
        self._freeze_unused_heads()
        # Like Hugging Face's from_pretrained: eval mode; the train loop calls model.train().
        self.eval()

    # ---- construction helpers ---------------------------------------------------------------

    def _prepare_backbone(self, backbone: nn.Module) -> nn.Module:
        mcfg = self.cfg.model
        layers = backbone.get_decoder().layers
        n_freeze = mcfg.freeze_layers
        if not 0 <= n_freeze <= len(layers):
            raise ConfigError(
                f"config key 'model.freeze_layers': {n_freeze} outside "
                f"[0, {len(layers)}] for this backbone"
            )
        if mcfg.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if mcfg.lora:
            from peft import LoraConfig, get_peft_model

            lora_cfg = LoraConfig(
                r=mcfg.lora_r,
                lora_alpha=mcfg.lora_alpha,
                lora_dropout=mcfg.lora_dropout,
                target_modules=LORA_TARGETS,
                bias="none",
                layers_to_transform=list(range(n_freeze, len(layers))) if n_freeze else None,
            )
            backbone = get_peft_model(backbone, lora_cfg)
        elif n_freeze > 0:
            backbone.get_input_embeddings().requires_grad_(False)
            for layer in layers[:n_freeze]:
                layer.requires_grad_(False)
        return backbone

    def _freeze_unused_heads(self) -> None:
        # Parameters that get no gradient would break DDP (unused parameters), so heads a preset
        # does not train are frozen. R stays in the model so analysis can fit it post hoc.
        if self.lambda_rec == 0:
            self.rec_head.requires_grad_(False)
            self.rec_norm.requires_grad_(False)
        if self.cfg.model.image_dim > 0 and self.lambda_img == 0:
            self.image_head.requires_grad_(False)
        lm = self.base_lm
        out = lm.get_output_embeddings()
        tied = out is not None and out.weight is lm.get_input_embeddings().weight
        if out is not None and not tied and self.lambda_gen == 0 and self.lambda_rec == 0:
            out.requires_grad_(False)

    # ---- backbone access --------------------------------------------------------------------

    @property
    def base_lm(self) -> nn.Module:
        """The Hugging Face causal LM (inside the peft wrapper when LoRA is on)."""
        if hasattr(self.backbone, "get_base_model"):
            return self.backbone.get_base_model()
        return self.backbone

    @property
    def device(self) -> torch.device:
        return self.special_embeds.device

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the learnable <ITEM>/<EMB> rows. (B, T) -> (B, T, d)"""
        emb = self.base_lm.get_input_embeddings()(input_ids)
        for j, token_id in enumerate((self.prompt.item_id, self.prompt.emb_id)):
            row = self.special_embeds[j].to(emb.dtype)
            emb = torch.where((input_ids == token_id)[..., None], row, emb)
        return emb

    @staticmethod
    def _fill(
        emb: torch.Tensor, input_ids: torch.Tensor, token_id: int, values: torch.Tensor, what: str
    ) -> torch.Tensor:
        """Replace the embeddings at `token_id` placeholders, row-major, by `values` (n, d)."""
        rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
        if rows.shape[0] != values.shape[0]:
            raise KarmaError(
                f"{what}: {rows.shape[0]} placeholder tokens but {values.shape[0]} vectors"
            )
        return emb.index_put((rows, cols), values.to(emb.dtype))

    def run_decoder(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states (after the final norm) for left- or right-padded inputs.

        Position ids count real tokens only, so a sequence gets the same positions whatever its
        padding. (B, T, d) -> (B, T, d)
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.base_lm.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    # ---- towers -----------------------------------------------------------------------------

    def encode_items(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item tower on tokenized items; returns (item_hidden (U, d), item_emb (U, k))."""
        emb = self.embed_tokens(input_ids)  # (U, T, d)
        if image_features is not None:
            image_tokens = self.image_proj(image_features.to(emb.dtype))  # (U, d)
            emb = self._fill(emb, input_ids, self.prompt.img_id, image_tokens, "image tokens")
        hidden = self.run_decoder(emb, attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        item_hidden = hidden[rows, last_positions(attention_mask)]  # (U, d) at <ITEM>
        item_emb = F.normalize(self.item_proj(item_hidden).float(), dim=-1)
        return item_hidden, item_emb

    def user_embeds(
        self, input_ids: torch.Tensor, history_hidden: torch.Tensor | None
    ) -> torch.Tensor:
        """Input embeddings of user sequences with <HIST> filled by P_h(history_hidden (n, d))."""
        emb = self.embed_tokens(input_ids)  # (B, T, d)
        if history_hidden is not None and history_hidden.shape[0] > 0:
            x = self.history_proj(history_hidden.to(emb.dtype))  # (n, d)
            emb = self._fill(emb, input_ids, self.prompt.hist_id, x, "history tokens")
        return emb

    def user_from_hidden(self, hidden: torch.Tensor, emb_positions: torch.Tensor) -> torch.Tensor:
        """u = normalize(W_u h_<EMB>). hidden (B, T, d), emb_positions (B,) -> (B, k)"""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return F.normalize(self.user_proj(hidden[rows, emb_positions]).float(), dim=-1)

    def reconstruction_prefix(self, user_emb: torch.Tensor) -> torch.Tensor:
        """R(u): m soft input tokens that must carry the target's text. (B, k) -> (B, m, d)"""
        prefix = self.rec_head(user_emb).view(user_emb.shape[0], self.cfg.model.rec_tokens, -1)
        return self.rec_norm(prefix)

    # ---- training ---------------------------------------------------------------------------

    def _history_hidden(
        self, batch: dict[str, torch.Tensor], item_hidden: torch.Tensor
    ) -> torch.Tensor | None:
        if self.cfg.model.interface != "continuous":
            return None
        if self.cfg.model.history_source == "live":
            index = batch["history_index"]
            return item_hidden[index[index >= 0]]  # (n, d), gradients reach the item tower
        items = batch["history_items"]
        items = items[items >= 0]
        if self.history_cache.shape[0] == 0:
            raise KarmaError(
                "model.history_source=cache but the history cache is empty; call "
                "model.refresh_history_cache(item_texts) first"
            )
        if items.numel() and int(items.max()) >= self.history_cache.shape[0]:
            raise KarmaError(
                f"history item {int(items.max())} outside the history cache of "
                f"{self.history_cache.shape[0]} items"
            )
        return self.history_cache[items]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training losses of one batch from `karma.batching.BatchBuilder`.

        Returns `loss` = act_loss + lambda_gen gen_loss + lambda_rec rec_loss
        (+ lambda_img img_loss), each part (zeros when off) and `temperature` (detached).
        Item tower once; user tower once for L_act and L_gen; one more pass for L_rec.
        """
        batch = {k: v.to(self.device) for k, v in batch.items()}
        item_hidden, item_emb = self.encode_items(
            batch["item_input_ids"], batch["item_attention_mask"], batch.get("item_image_features")
        )
        input_ids = batch["user_input_ids"]
        emb = self.user_embeds(input_ids, self._history_hidden(batch, item_hidden))
        hidden = self.run_decoder(emb, batch["user_attention_mask"])  # (B, T, d)
        user_emb = self.user_from_hidden(hidden, batch["emb_positions"])  # (B, k)

        n_cand = int(batch["candidate_count"])
        out = self.action_loss(
            user_emb, item_emb[:n_cand], batch["positive_index"], batch["item_ids"][:n_cand]
        )
        zero = user_emb.new_zeros(())
        lm_head = self.base_lm.get_output_embeddings()
        out["gen_loss"] = zero
        if self.lambda_gen > 0:
            out["gen_loss"] = self.token_loss(hidden, batch["user_labels"], lm_head)
        out["rec_loss"] = zero
        if self.lambda_rec > 0:
            rec_ids = batch["rec_input_ids"]
            prefix = self.reconstruction_prefix(user_emb)  # (B, m, d)
            rec_emb = self._fill(
                self.embed_tokens(rec_ids),
                rec_ids,
                self.prompt.rec_id,
                prefix.reshape(-1, prefix.shape[-1]),
                "reconstruction tokens",
            )
            rec_hidden = self.run_decoder(rec_emb, batch["rec_attention_mask"])
            out["rec_loss"] = self.token_loss(rec_hidden, batch["rec_labels"], lm_head)
        loss = out["act_loss"] + self.lambda_gen * out["gen_loss"]
        loss = loss + self.lambda_rec * out["rec_loss"]
        if self.cfg.model.image_dim > 0:
            out["img_loss"] = zero
            if self.lambda_img > 0:
                pred = self.image_head(user_emb).float()  # (B, D)
                # Mean over batch and feature dims of the squared error: scale-free in D.
                out["img_loss"] = F.mse_loss(pred, batch["target_image_features"].float())
            loss = loss + self.lambda_img * out["img_loss"]
        out["loss"] = loss
        return out

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Same as calling the model; under DDP call the DDP wrapper so gradients sync."""
        return self(batch)

    def param_groups(self, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: backbone (lr) and new heads + temperature (head_lr), with no weight
        decay on biases, norms, embeddings and the temperature. Frozen parameters are left out."""
        groups: dict[str, list[nn.Parameter]] = {
            "backbone": [],
            "backbone_no_decay": [],
            "heads": [],
            "heads_no_decay": [],
        }
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "backbone" if name.startswith("backbone.") else "heads"
            no_decay = (
                p.ndim < 2 or "embed" in name or "norm" in name or name.startswith("special_embeds")
            )
            groups[part + ("_no_decay" if no_decay else "")].append(p)
        settings = {
            "backbone": (lr, weight_decay),
            "backbone_no_decay": (lr, 0.0),
            "heads": (head_lr, weight_decay),
            "heads_no_decay": (head_lr, 0.0),
        }
        return [
            {"name": n, "params": ps, "lr": settings[n][0], "weight_decay": settings[n][1]}
            for n, ps in groups.items()
            if ps
        ]

    # ---- inference --------------------------------------------------------------------------

    def _check_images(self, image_features: Any, n: int) -> torch.Tensor | None:
        if self.cfg.model.image_dim <= 0:
            if image_features is not None:
                raise KarmaError("image_features given but the model has model.image_dim=0")
            return None
        if image_features is None:
            raise KarmaError(
                f"the model has an image token (model.image_dim="
                f"{self.cfg.model.image_dim}); pass image_features"
            )
        feats = torch.as_tensor(np.asarray(image_features), dtype=torch.float32)
        if feats.shape != (n, self.cfg.model.image_dim):
            raise KarmaError(
                f"image_features: expected shape ({n}, {self.cfg.model.image_dim}),"
                f" got {tuple(feats.shape)}"
            )
        return feats

    @torch.no_grad()
    def encode_catalog(
        self,
        item_texts: Sequence[str],
        batch_size: int = 64,
        image_features: np.ndarray | torch.Tensor | None = None,
        progress: bool = True,
    ) -> CatalogEncoding:
        """Item tower over a catalog (eval mode, no grad); rows follow `item_texts`."""
        feats = self._check_images(image_features, len(item_texts))
        was_training = self.training
        self.eval()
        seqs = [
            self.prompt.item(ids, image=feats is not None)
            for ids in self.prompt.encode_many(list(item_texts))
        ]
        # Batches of similar length waste little compute on padding.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        item_emb = torch.zeros(len(seqs), self.cfg.model.emb_dim)
        item_hidden = torch.zeros(len(seqs), self.hidden_size)
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc="encode items", disable=not progress, leave=False):
            idx = order[s : s + batch_size]
            ids, mask, _ = pad_sequences([seqs[i] for i in idx], self.prompt.pad_id)
            img = feats[idx].to(self.device) if feats is not None else None
            hidden, emb = self.encode_items(ids.to(self.device), mask.to(self.device), img)
            item_emb[idx] = emb.float().cpu()
            item_hidden[idx] = hidden.float().cpu()
        self.train(was_training)
        return CatalogEncoding(item_emb=item_emb, item_hidden=item_hidden)

    def build_user_inputs(
        self,
        histories: Sequence[Sequence[int]],
        queries: Sequence[str],
        catalog: CatalogEncoding | None,
        item_texts: Sequence[str] | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Inputs of the user tower without targets, on the model's device.

        Returns inputs_embeds (B, T, d), attention_mask (B, T), position_ids (B, T),
        emb_positions (B,), history_positions (B, n) (-1 padded; <HIST> tokens, or the last
        token of each item text for the text interface) and first_positions (B,) (<bos>).
        Run `model.base_lm.get_decoder()` or `model.backbone` on them (same position ids).
        """
        if len(histories) != len(queries):
            raise KarmaError(f"{len(histories)} histories but {len(queries)} queries")
        continuous = self.cfg.model.interface == "continuous"
        n_items = (
            catalog.item_hidden.shape[0]
            if continuous and catalog is not None
            else len(item_texts)
            if item_texts is not None
            else None
        )
        if continuous and catalog is None:
            raise KarmaError("the continuous interface needs the catalog encoding")
        if not continuous and item_texts is None:
            raise KarmaError("the text interface needs item_texts")
        seqs, hist_pos, emb_pos = [], [], []
        for b, (hist, query) in enumerate(zip(histories, queries)):
            for i in hist:
                if not 0 <= int(i) < n_items:
                    raise KarmaError(f"histories[{b}]: item index {i} outside [0, {n_items})")
            texts = None if continuous else [item_texts[int(i)] for i in hist]
            ids, pos, e, _ = self.prompt.user(query or "", n_history=len(hist), history_texts=texts)
            seqs.append(ids)
            hist_pos.append(pos)
            emb_pos.append(e)
        ids, mask, shift = pad_sequences(seqs, self.prompt.pad_id, padding_side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        history_hidden = None
        if continuous:
            flat = [int(i) for h in histories for i in h]
            history_hidden = catalog.item_hidden[torch.tensor(flat, dtype=torch.long)]
            history_hidden = history_hidden.to(self.device)
        n = max((len(p) for p in hist_pos), default=0)
        history_positions = torch.full((len(seqs), n), -1, dtype=torch.long)
        for b, pos in enumerate(hist_pos):
            history_positions[b, : len(pos)] = torch.tensor(pos, dtype=torch.long) + shift[b]
        return {
            "inputs_embeds": self.user_embeds(ids, history_hidden),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "emb_positions": (torch.tensor(emb_pos, dtype=torch.long) + shift).to(self.device),
            "history_positions": history_positions.to(self.device),
            "first_positions": shift.to(self.device),
        }

    @torch.no_grad()
    def encode_users(
        self,
        histories: Sequence[Sequence[int]],
        queries: Sequence[str],
        catalog: CatalogEncoding | None,
        item_texts: Sequence[str] | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> torch.Tensor:
        """User embeddings u (B, k), float32 on CPU (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        out = torch.zeros(len(histories), self.cfg.model.emb_dim)
        starts = range(0, len(histories), batch_size)
        for s in tqdm(starts, desc="encode users", disable=not progress, leave=False):
            inputs = self.build_user_inputs(
                histories[s : s + batch_size], queries[s : s + batch_size], catalog, item_texts
            )
            hidden = self.run_decoder(inputs["inputs_embeds"], inputs["attention_mask"])
            out[s : s + batch_size] = self.user_from_hidden(hidden, inputs["emb_positions"]).cpu()
        self.train(was_training)
        return out

    @torch.no_grad()
    def refresh_history_cache(
        self,
        item_texts: Sequence[str],
        batch_size: int = 64,
        image_features: np.ndarray | torch.Tensor | None = None,
        progress: bool = False,
    ) -> None:
        """Recompute h_i of every item for history_source=cache. Under DDP each rank encodes
        an interleaved shard and the shards are gathered."""
        rank, world = self.action_loss.rank, self.action_loss.world_size
        n = len(item_texts)
        shard = list(range(rank, n, world))
        feats = self._check_images(image_features, n)
        enc = self.encode_catalog(
            [item_texts[i] for i in shard],
            batch_size,
            feats[shard] if feats is not None else None,
            progress,
        )
        hidden = enc.item_hidden.to(self.device)
        if world > 1:
            # Rank r holds items r, r + W, ...: gather, then undo the interleaving.
            gathered = gather_no_grad(hidden)
            index = torch.cat([torch.arange(r, n, world) for r in range(world)])
            hidden = torch.empty_like(gathered)
            hidden[index.to(self.device)] = gathered
        self.history_cache = hidden.to(self.special_embeds.dtype)

    # ---- persistence ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the full state (backbone incl. LoRA, heads, temperature, history cache) to
        `directory/model.safetensors`; tied embeddings are stored once."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / WEIGHTS_NAME
        tmp = path.with_suffix(".tmp")
        save_model(self, str(tmp))
        tmp.replace(path)
        return path

    def load_weights(self, directory: str | Path) -> None:
        """Load a state written by `save_pretrained` into this (identically configured) model."""
        from safetensors.torch import load_model

        path = Path(directory) / WEIGHTS_NAME
        if not path.exists():
            raise KarmaError(f"{path}: no karma weights there")
        try:
            load_model(self, str(path), strict=True, device=str(self.device))
        except RuntimeError as exc:
            raise KarmaError(f"{path}: weights do not match the config: {exc}") from exc

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, cfg: Config, rank: int = 0, world_size: int = 1
    ) -> KarmaModel:
        """Build the model for `cfg` and load `directory/model.safetensors` into it."""
        model = build_model(cfg, rank=rank, world_size=world_size)
        model.load_weights(directory)
        return model


def _resize_history_cache(module: KarmaModel, state_dict: dict, prefix: str, *args: Any) -> None:
    # The cache's size is only known from the checkpoint; make room before the copy.
    key = prefix + "history_cache"
    if key in state_dict and state_dict[key].shape != module.history_cache.shape:
        module.history_cache = module.history_cache.new_zeros(state_dict[key].shape)


def build_model(cfg: Config, rank: int = 0, world_size: int = 1) -> KarmaModel:
    """Load cfg.model.backbone and wrap it; `rank`/`world_size` set up the DDP InfoNCE gather."""
    from karma.backbones import load_backbone

    backbone, tokenizer = load_backbone(
        cfg.model.backbone, attn_implementation=cfg.model.attn_implementation
    )
    return KarmaModel(backbone, tokenizer, cfg, rank=rank, world_size=world_size)
