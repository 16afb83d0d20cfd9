"""KarmaModel: a Hugging Face causal LM wrapped as an item tower and a user tower, plus heads.

    model = build_model(cfg)                                   # backbone from karma.backbones
    item_hidden, item_emb = model.encode_items(input_ids, attention_mask)     # item tower
    hidden = model.run_decoder(model.user_embeds(user_ids, history_hidden), mask)
    user_emb = model.user_from_hidden(hidden, emb_positions)                 # user tower

This module is only the model: the towers and the soft-token projections. The training objective
(losses, their weights, the learnable temperature) is karma/objective.py, inference over a catalog
and users is karma/inference.py, prompt layouts are karma/batching.py and weights are saved and
loaded by karma/checkpoint.py.

Item tower: `<bos> [<IMG>] text <ITEM>`; h_i = last hidden state at <ITEM>;
e_i = normalize(W_e h_i).
User tower (continuous): `<bos> Query: q History: x_1 .. x_n <EMB>` through inputs_embeds with
x_i = P_h(h_i) one input embedding per history item; u = normalize(W_u h_<EMB>). The `text`
interface writes the history items out instead. Train-only heads: R (u -> m soft tokens for
L_rec), g (u -> image feature for L_img). The learnable <ITEM>/<EMB> input embeddings live in
`special_embeds`, outside the (possibly frozen or LoRA-wrapped) embedding matrix, so they always
train.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from karma.batching import PromptFormat, add_special_tokens
from karma.config import Config, ConfigError
from karma.errors import KarmaError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)"""
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * t).argmax(-1)


def fill_placeholders(
    emb: torch.Tensor, input_ids: torch.Tensor, token_id: int, values: torch.Tensor, what: str
) -> torch.Tensor:
    """Replace the embeddings at `token_id` placeholders, row-major, by `values` (n, d)."""
    rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
    if rows.shape[0] != values.shape[0]:
        raise KarmaError(
            f"{what}: {rows.shape[0]} placeholder tokens but {values.shape[0]} vectors"
        )
    return emb.index_put((rows, cols), values.to(emb.dtype))


def _scaled_rmsnorm(d: int, rms: float) -> nn.RMSNorm:
    # Soft input tokens are normalized to the RMS of the token embeddings, so that they enter the
    # LLM on the scale it was trained on (last hidden states are far larger than embeddings).
    norm = nn.RMSNorm(d, eps=1e-6)
    nn.init.constant_(norm.weight, rms)
    return norm


class KarmaModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer: Any, cfg: Config) -> None:
        super().__init__()
        mcfg = cfg.model
        self.cfg = cfg
        self.tokenizer = tokenizer
        if mcfg.interface not in ("continuous", "text"):
            raise ConfigError(
                f"config key 'model.interface': expected continuous or text, got {mcfg.interface!r}"
            )
        if mcfg.history_source not in ("live", "cache"):
            raise ConfigError(
                f"config key 'model.history_source': expected live or cache, got "
                f"{mcfg.history_source!r}"
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
        # h_i of every item for history_source=cache; empty until karma.inference fills it.
        self.register_buffer("history_cache", torch.zeros(0, d))
        self.register_load_state_dict_pre_hook(_resize_history_cache)

        self.backbone = self._prepare_backbone(backbone)
        # Like Hugging Face's from_pretrained: eval mode; training calls objective.train().
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
            emb = fill_placeholders(
                emb, input_ids, self.prompt.img_id, image_tokens, "image tokens"
            )
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
            emb = fill_placeholders(emb, input_ids, self.prompt.hist_id, x, "history tokens")
        return emb

    def user_from_hidden(self, hidden: torch.Tensor, emb_positions: torch.Tensor) -> torch.Tensor:
        """u = normalize(W_u h_<EMB>). hidden (B, T, d), emb_positions (B,) -> (B, k)"""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return F.normalize(self.user_proj(hidden[rows, emb_positions]).float(), dim=-1)

    def reconstruction_prefix(self, user_emb: torch.Tensor) -> torch.Tensor:
        """R(u): m soft input tokens that must carry the target's text. (B, k) -> (B, m, d)"""
        prefix = self.rec_head(user_emb).view(user_emb.shape[0], self.cfg.model.rec_tokens, -1)
        return self.rec_norm(prefix)


def _resize_history_cache(module: KarmaModel, state_dict: dict, prefix: str, *args: Any) -> None:
    # The cache's size is only known from the checkpoint; make room before the copy.
    key = prefix + "history_cache"
    if key in state_dict and state_dict[key].shape != module.history_cache.shape:
        module.history_cache = module.history_cache.new_zeros(state_dict[key].shape)


def build_model(cfg: Config) -> KarmaModel:
    """Load cfg.model.backbone and wrap it (eval mode, like Hugging Face's from_pretrained)."""
    from karma.backbones import load_backbone

    backbone, tokenizer = load_backbone(
        cfg.model.backbone, attn_implementation=cfg.model.attn_implementation
    )
    return KarmaModel(backbone, tokenizer, cfg)
