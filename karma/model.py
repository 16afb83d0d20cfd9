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
e_i = normalize(W_e h_i). With model.image_fusion late (or both) the image enters after the
frozen parts instead (or as well): trainable maps of the frozen features v_i are added to e_i and
to each history token entering layer model.freeze_layers, where item IDs are added.
User tower (continuous): `<bos> Query: q History: x_1 .. x_n <EMB>` through inputs_embeds with
x_i = P_h(h_i) one input embedding per history item; u = normalize(W_u h_<EMB>). The `text`
interface writes the history items out instead. Train-only heads: R (u -> m soft tokens for
L_rec), g (u -> image feature for L_img). The learnable <ITEM>/<EMB> input embeddings live in
`special_embeds`, outside the (possibly frozen or LoRA-wrapped) embedding matrix, so they always
train.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from karma.batching import PromptFormat, add_special_tokens
from karma.config import Config, ConfigError
from karma.errors import KarmaError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # model.lora_mlp


def cache_keyword(module: nn.Module) -> str:
    """The KV-cache argument of a Hugging Face decoder or causal LM (peft-wrapped or not):
    transformers >= 5.24 calls it `cache`, earlier versions `past_key_values`."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
        if mcfg.lora_mlp and not mcfg.lora:
            raise ConfigError(
                "config key 'model.lora_mlp': adds LoRA targets, so it needs model.lora=true"
            )
        if mcfg.tie_item_ids and not mcfg.item_ids:
            raise ConfigError(
                "config key 'model.tie_item_ids': ties the item-ID embeddings, so it needs "
                "model.item_ids=true"
            )
        if not mcfg.train_item_tower and not mcfg.lora:
            raise ConfigError(
                "config key 'model.train_item_tower': false runs the item tower with the LoRA "
                "adapters off, so it needs model.lora=true"
            )

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
        if mcfg.image_token:
            self.image_proj = nn.Sequential(
                nn.Linear(mcfg.image_dim, d),
                nn.GELU(),
                nn.Linear(d, d),
                _scaled_rmsnorm(d, emb_rms),
            )
        if mcfg.image_late:
            self.image_item = _late_image_map(mcfg.image_dim, k)  # added to W_e h_i
            self.image_history = _late_image_map(mcfg.image_dim, d)  # added to history tokens
            # The catalog's frozen features (N, image_dim), set with the catalog
            # (set_image_table); not saved, the prepared dataset keeps them.
            self.register_buffer("image_table", torch.zeros(0, mcfg.image_dim), persistent=False)
        if mcfg.image_dim > 0:
            self.image_head = nn.Sequential(
                nn.Linear(k, d), nn.GELU(), nn.Linear(d, mcfg.image_dim)
            )  # g
        # h_i of every item for history_source=cache; empty until karma.inference fills it.
        self.register_buffer("history_cache", torch.zeros(0, d))
        # Catalog statistics for model.item_norm (identity until set_item_statistics).
        self.register_buffer("item_mean", torch.zeros(d))
        self.register_buffer("item_scale", torch.ones(d))
        if mcfg.item_ids:
            # Sized by init_item_ids (training) or by the checkpoint (loading).
            self.item_id_emb = nn.Parameter(torch.zeros(0, k))  # added to W_e h_i
            if mcfg.tie_item_ids:
                # history tokens get id_to_history(item_id_emb[i]): (k,) -> (d,)
                self.id_to_history = nn.Linear(k, d, bias=False)
            else:
                self.history_id_emb = nn.Parameter(torch.zeros(0, d))  # added to history tokens
            self.register_buffer("id_known", torch.zeros(0, dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_resize_catalog_tensors)

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
                target_modules=LORA_TARGETS + (LORA_MLP_TARGETS if mcfg.lora_mlp else []),
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
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        history_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (after the final norm) for left- or right-padded inputs.

        Position ids count real tokens only, so a sequence gets the same positions whatever its
        padding. history_ids (B, T): the item index of each history token, -1 elsewhere; their
        `history_residual` (ID embeddings, late image maps) joins the residual stream at the
        first trainable layer (model.freeze_layers), so frozen lower layers stay a pure function
        of the text.
        (B, T, d) -> (B, T, d)
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        decoder = self.base_lm.get_decoder()
        if history_ids is None or not self.has_history_residual:
            out = decoder(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            return out.last_hidden_state
        hidden = self.run_lower(inputs_embeds, attention_mask)
        hidden = hidden + self.history_residual(history_ids).to(hidden.dtype)
        return self.run_from_layer(hidden, attention_mask, self.cfg.model.freeze_layers)

    def run_from_layer(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layers start.. and the final norm on the residual stream `hidden` (B, T, d) entering
        layer `start`; the second half of `run_decoder`, also fed from cached lower states.
        attention_mask (B, T), or a 4D (B, 1, T, T) mask (bool for sdpa, additive float for
        eager) with explicit position_ids (B, T) (packed rows: karma.sequence.
        pack_search_examples); the default position ids count real tokens."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        decoder = self.base_lm.get_decoder()
        span = _decoder_span(decoder, start, len(decoder.layers), final_norm=True)
        out = span(
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def run_lower(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past: Any | None = None,
    ) -> torch.Tensor:
        """The residual stream entering layer model.freeze_layers (the frozen lower layers
        only, no final norm); position ids default to counting real tokens. (B, T, d) -> same

        past: a transformers Cache of the lower layers' key/values of earlier tokens (left-padded
        rows), extended in place with the new ones; attention_mask (B, P + T) then covers the
        past as well, so the default position ids continue each row's real past tokens."""
        cut = self.cfg.model.freeze_layers
        if cut == 0:
            return inputs_embeds
        if position_ids is None:
            T = inputs_embeds.shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        decoder = self.base_lm.get_decoder()
        span = _decoder_span(decoder, 0, cut, final_norm=False)
        kwargs = {cache_keyword(decoder): past} if past is not None else {}
        out = span(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=past is not None,
            **kwargs,
        )
        return out.last_hidden_state

    # ---- items: conditioning and IDs ----------------------------------------------------------

    @torch.no_grad()
    def set_item_statistics(self, item_hidden: torch.Tensor) -> None:
        """Catalog mean / std of h_i (N, d) for model.item_norm; called with each refresh of the
        catalog states, so the conditioning follows the item tower."""
        norm = self.cfg.model.item_norm
        if norm == "none":
            return
        h = item_hidden.float()
        self.item_mean.copy_(h.mean(0))
        if norm == "standardize":
            self.item_scale.copy_(h.std(0).clamp(min=1e-6))

    def condition(self, item_hidden: torch.Tensor) -> torch.Tensor:
        """h_i as P_h and W_e see it: centred / standardized over the catalog (model.item_norm).
        Raw last-layer states share one dominant direction (cosine ~0.86 on SmolLM2), which made
        every history token look alike."""
        if self.cfg.model.item_norm == "none":
            return item_hidden
        mean, scale = self.item_mean.to(item_hidden.dtype), self.item_scale.to(item_hidden.dtype)
        return (item_hidden - mean) / scale

    @torch.no_grad()
    def init_item_ids(self, n_items: int, known: torch.Tensor) -> None:
        """Zero ID embeddings for a catalog of n_items; known (n_items,) bool marks the items seen
        in training, the only ones whose ID is ever used (the rest fall back to text)."""
        if not self.cfg.model.item_ids:
            return
        device = self.special_embeds.device
        self.item_id_emb = nn.Parameter(torch.zeros(n_items, self.cfg.model.emb_dim, device=device))
        if not self.cfg.model.tie_item_ids:
            d = self.hidden_size
            self.history_id_emb = nn.Parameter(torch.zeros(n_items, d, device=device))
        self.id_known = known.to(device=device, dtype=torch.bool)

    @torch.no_grad()
    def restrict_item_ids(self, keep: torch.Tensor) -> None:
        """Use only the ID embeddings of the items where keep (n_items,) is True: the others are
        scored on their text alone, as items never seen in training are (eval.id_min_count)."""
        if not self.cfg.model.item_ids:
            raise KarmaError(
                "eval.id_min_count: this checkpoint has no item-ID embeddings (model.item_ids "
                "is false); set eval.id_min_count=0"
            )
        if keep.shape != self.id_known.shape:
            raise KarmaError(
                f"eval.id_min_count: the data has {keep.numel()} items, the checkpoint's ID "
                f"table {self.id_known.numel()}"
            )
        self.id_known = self.id_known & keep.to(self.id_known.device, torch.bool)

    def _id_rows(self, table: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """ID embeddings of item_ids (any shape, -1 = none): zero for unknown items, and dropped
        with probability model.id_dropout in training so the text path keeps learning."""
        valid = item_ids >= 0
        ids = item_ids.clamp(min=0)
        keep = valid & self.id_known[ids]
        p = self.cfg.model.id_dropout
        if self.training and p > 0:
            keep = keep & (torch.rand(ids.shape, device=ids.device) >= p)
        return table[ids] * keep.unsqueeze(-1).to(table.dtype)

    @torch.no_grad()
    def set_image_table(self, image_features: Any) -> None:
        """The catalog's frozen image features (N, image_dim) (array or tensor, rows in catalog
        order), where the late image maps look up history items; called where a model meets its
        prepared catalog (training, evaluation, serving, analysis). A no-op for None or for a
        model without late image maps."""
        if self.cfg.model.image_late and image_features is not None:
            self.image_table = torch.as_tensor(image_features).to(self.device, torch.float32)

    def _image_rows(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Frozen image features of item_ids (any shape, -1 = none: zeros). -> (..., image_dim)"""
        n = self.image_table.shape[0]
        if n == 0:
            raise KarmaError(
                f"model.image_fusion={self.cfg.model.image_fusion} adds each item's image "
                "features, but the model has none: encode the catalog with its image_features "
                "first (karma.inference.encode_catalog) or call set_image_table"
            )
        if item_ids.numel() and int(item_ids.max()) >= n:
            raise KarmaError(f"item {int(item_ids.max())} outside the {n} image features")
        valid = (item_ids >= 0).unsqueeze(-1)
        return self.image_table[item_ids.clamp(min=0)] * valid

    @property
    def has_history_residual(self) -> bool:
        """Whether history tokens get a `history_residual` (item IDs or late image maps)."""
        return self.cfg.model.item_ids or self.cfg.model.image_late

    def history_residual(self, history_ids: torch.Tensor) -> torch.Tensor:
        """What joins each history token entering layer model.freeze_layers: its ID embedding
        (model.item_ids) plus its late image map (model.image_fusion late/both), zero where
        history_ids is -1. (B, T) -> (B, T, d)"""
        mcfg = self.cfg.model
        out = history_ids.new_zeros((*history_ids.shape, self.hidden_size), dtype=torch.float32)
        if mcfg.tie_item_ids:
            out = out + self.id_to_history(self._id_rows(self.item_id_emb, history_ids))
        elif mcfg.item_ids:
            out = out + self._id_rows(self.history_id_emb, history_ids)
        if mcfg.image_late:
            valid = (history_ids >= 0).unsqueeze(-1)  # the map's bias stays off non-items
            out = out + self.image_history(self._image_rows(history_ids)) * valid
        return out

    @contextmanager
    def history_residual_injected(self, history_ids: torch.Tensor | None):
        """While active, a plain call of the HF decoder adds the history tokens'
        `history_residual` where `run_decoder` adds it (entering layer model.freeze_layers): for
        code that needs the decoder's own outputs, e.g. attentions in karma.analysis.
        history_ids (B, T)."""
        if history_ids is None or not self.has_history_residual:
            yield
            return
        ids = self.history_residual(history_ids)  # (B, T, d)

        def add_ids(module, args, kwargs):
            if args:
                return (args[0] + ids.to(args[0].dtype), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            kwargs["hidden_states"] = hidden + ids.to(hidden.dtype)
            return args, kwargs

        layer = self.base_lm.get_decoder().layers[self.cfg.model.freeze_layers]
        handle = layer.register_forward_pre_hook(add_ids, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def item_embedding(
        self,
        item_hidden: torch.Tensor,
        item_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """e_i = normalize(W_e cond(h_i) [+ ID_i] [+ late image map of v_i]). (U, d) -> (U, k),
        float32. item_ids (U,) select the ID rows; the late image map (model.image_fusion
        late/both) reads image_features (U, D), else the image table's rows of item_ids."""
        z = self.item_proj(self.condition(item_hidden))
        if self.cfg.model.item_ids and item_ids is not None:
            z = z + self._id_rows(self.item_id_emb, item_ids).to(z.dtype)
        if self.cfg.model.image_late:
            if image_features is None:
                if item_ids is None:
                    raise KarmaError(
                        f"model.image_fusion={self.cfg.model.image_fusion}: item embeddings need "
                        "the items' image features or their ids in the image table"
                    )
                image_features = self._image_rows(item_ids)
            z = z + self.image_item(image_features.float()).to(z.dtype)
        return F.normalize(z.float(), dim=-1)

    # ---- towers -----------------------------------------------------------------------------

    def encode_items(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        item_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item tower on tokenized items; returns (item_hidden (U, d), item_emb (U, k)).
        item_ids (U,) adds the ID embeddings of a hybrid model (model.item_ids); image_features
        (U, D) fill the image token (model.image_fusion token/both) and feed the late image
        map (late/both)."""
        emb = self.embed_tokens(input_ids)  # (U, T, d)
        if image_features is not None and self.cfg.model.image_token:
            image_tokens = self.image_proj(image_features.to(emb.dtype))  # (U, d)
            emb = fill_placeholders(
                emb, input_ids, self.prompt.img_id, image_tokens, "image tokens"
            )
        frozen = not self.cfg.model.train_item_tower
        with self.backbone.disable_adapter() if frozen else nullcontext():
            hidden = self.run_decoder(emb, attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        item_hidden = hidden[rows, last_positions(attention_mask)]  # (U, d) at <ITEM>
        return item_hidden, self.item_embedding(item_hidden, item_ids, image_features)

    def user_embeds(
        self, input_ids: torch.Tensor, history_hidden: torch.Tensor | None
    ) -> torch.Tensor:
        """Input embeddings of user sequences with <HIST> filled by P_h(history_hidden (n, d))."""
        emb = self.embed_tokens(input_ids)  # (B, T, d)
        if history_hidden is not None and history_hidden.shape[0] > 0:
            x = self.history_proj(self.condition(history_hidden.to(emb.dtype)))  # (n, d)
            emb = fill_placeholders(emb, input_ids, self.prompt.hist_id, x, "history tokens")
        return emb

    def user_from_hidden(
        self,
        hidden: torch.Tensor,
        emb_positions: torch.Tensor,
        history_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """u = normalize(W_u h_<EMB>). hidden (B, T, d), emb_positions (B,) -> (B, k).

        history_end (B,): position of each prompt's last history token (-1: no history). With
        model.search_readout=sum, a row whose <EMB> is not that token (a query follows the
        history) adds W_u of its state: u = normalize(W_u h_<EMB> + W_u h_{x_c})."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        out = self.user_proj(hidden[rows, emb_positions])
        if self.cfg.model.search_readout == "sum" and history_end is not None:
            history_end = history_end.to(hidden.device)
            add = ((history_end >= 0) & (history_end != emb_positions)).to(out.dtype)
            out = out + add[:, None] * self.user_proj(hidden[rows, history_end.clamp(min=0)])
        return F.normalize(out.float(), dim=-1)

    def reconstruction_prefix(self, user_emb: torch.Tensor) -> torch.Tensor:
        """R(u): m soft input tokens that must carry the target's text. (B, k) -> (B, m, d)"""
        prefix = self.rec_head(user_emb).view(user_emb.shape[0], self.cfg.model.rec_tokens, -1)
        return self.rec_norm(prefix)


def _late_image_map(image_dim: int, out: int) -> nn.Module:
    """Late image fusion (model.image_fusion late/both): LayerNorm then a linear map of the frozen
    features, zero at the start so training begins from the text model. (..., D) -> (..., out)"""
    linear = nn.Linear(image_dim, out)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.LayerNorm(image_dim), linear)


def _resize_catalog_tensors(module: KarmaModel, state_dict: dict, prefix: str, *args: Any) -> None:
    # Catalog-sized tensors (history cache, ID embeddings) are only sized by the checkpoint; make
    # room before the copy.
    for name in ("history_cache", "id_known", "item_id_emb", "history_id_emb"):
        key = prefix + name
        if not hasattr(module, name) or key not in state_dict:
            continue
        current = getattr(module, name)
        if state_dict[key].shape != current.shape:
            resized = current.new_zeros(state_dict[key].shape)
            setattr(
                module,
                name,
                nn.Parameter(resized) if isinstance(current, nn.Parameter) else resized,
            )


def _decoder_span(decoder: nn.Module, start: int, end: int, final_norm: bool) -> nn.Module:
    """A view of a Hugging Face decoder running only layers [start, end), sharing every weight
    (LoRA included): `inputs_embeds` then is the residual stream entering layer `start`. The
    decoder's own forward (rotary positions, causal mask) runs unchanged."""
    span = copy.copy(decoder)
    span._modules = dict(decoder._modules)
    span.layers = decoder.layers[start:end]
    if not final_norm:
        span.norm = nn.Identity()
    return span


def build_model(cfg: Config) -> KarmaModel:
    """Load cfg.model.backbone and wrap it (eval mode, like Hugging Face's from_pretrained)."""
    from karma.backbones import load_backbone

    backbone, tokenizer = load_backbone(
        cfg.model.backbone, attn_implementation=cfg.model.attn_implementation
    )
    return KarmaModel(backbone, tokenizer, cfg)
