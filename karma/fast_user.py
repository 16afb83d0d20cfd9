"""Fast online user embeddings: reuse the key/values of prompt prefixes across requests.

    encoder = FastUserEncoder(model, catalog, item_texts, max_cached_users=256)
    u = encoder.encode([[12, 7, 99]], ["comedy"], user_keys=["u42"])   # (B, k) float32
    u_plain = plain_user_embeddings(model, [[12, 7, 99]], ["comedy"], catalog, item_texts)

A user prompt is a token sequence (karma/batching.py, `PromptFormat.user`). Each position gets a
content key: its token id, or the item index for a `<HIST>` placeholder (whose input embedding is
P_h(h_i), so the token id alone does not say what it holds). Two prompts with the same keys up to
position L have the same key/values up to L (causal attention, positions counting real tokens),
so the key/values of a prefix computed once can be reused and only the rest is run. Two caches:

- shared: the text before the first history item (`<bos> Query: q History:` in the query-first
  layout, `<bos> History:` in model.prompt_layout=history_first), one small LRU for all users;
- per user: every key/value before `<EMB>`, keyed by user id (or by the history itself for
  anonymous requests). A new request of the same user reuses the longest common prefix: with
  the history before the query a new query runs only its own tokens, and a new click runs only
  the new item onwards; in the query-first layout the query-less case runs `<EMB>` alone.

With LoRA the prompts run through a copy of the backbone with the adapters merged; the new
history tokens' `history_residual` (item IDs, late image maps) joins the residual stream at layer
model.freeze_layers, as in `KarmaModel.run_decoder`. With `runtime="onnx"` or `"onnx-int8"`
(serve.runtime) the same decoder runs exported, in ONNX Runtime (karma/onnx_decoder.py).

Nothing here hard-codes a layout: segments come from the ids `PromptFormat` produces, so the
parity test (tests/test_fast_user.py) holds whatever layout it uses. Requests are batched with
their cached prefixes left-padded and the new tokens right-padded, with explicit position ids;
the result matches the training-time path (`plain_user_embeddings`) to cosine >= 0.999 (in fact
to float rounding). All calls into the model are in the adapter section below, so a move of the
inference API (karma/inference.py) re-points a handful of functions.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from karma.errors import KarmaError
from karma.model import cache_keyword

# ---- adapter: every call into KarmaModel lives here -------------------------------------------


def plain_user_embeddings(
    model: Any,
    histories: Sequence[Sequence[int]],
    queries: Sequence[str],
    catalog: Any,
    item_texts: Sequence[str] | None,
) -> torch.Tensor:
    """The training-time path (one plain forward of the whole prompt). -> (B, k) float32"""
    from karma.inference import encode_users

    return encode_users(model, histories, queries, catalog, item_texts, batch_size=len(histories))


def _prompt_ids(
    model: Any, query: str, history: Sequence[int], item_texts: Sequence[str] | None
) -> tuple[list[int], int]:
    """(token ids, position of <EMB>) of the user prompt, exactly as the model builds it."""
    texts = None
    if model.cfg.model.interface != "continuous":
        texts = [item_texts[i] for i in history]
    ids, _, emb_position, _ = model.prompt.user(query, n_history=len(history), history_texts=texts)
    return ids, emb_position


def _hist_token_id(model: Any) -> int | None:
    """The placeholder whose embedding is an item vector (None for the text interface)."""
    return model.prompt.hist_id if model.cfg.model.interface == "continuous" else None


def _input_embeds(
    model: Any, ids: torch.Tensor, history_hidden: torch.Tensor | None
) -> torch.Tensor:
    """Input embeddings (1, T, d) with <HIST> filled by P_h(h_i) for history_hidden (n, d)."""
    return model.user_embeds(ids.to(model.device), history_hidden)


def _decoder(model: Any) -> torch.nn.Module:
    """The decoder the user prompts run through. With LoRA, a copy of the backbone with the
    adapters merged into its weights (peft's merge_and_unload): the adapters' extra matmuls per
    layer are gone, and the model keeps its own adapters (the item tower of
    model.train_item_tower=false runs with them switched off)."""
    if hasattr(model.backbone, "merge_and_unload"):
        return copy.deepcopy(model.backbone).merge_and_unload().get_decoder()
    return model.base_lm.get_decoder()


def _residual_site(model: Any, decoder: torch.nn.Module) -> str | None:
    """The decoder submodule whose input gets the history tokens' `history_residual` (ID
    embeddings of a hybrid model, late image maps): layer model.freeze_layers, where
    `KarmaModel.run_decoder` adds it, or with all layers frozen the final norm. None for a
    model without one."""
    if not model.has_history_residual:
        return None
    cut = model.cfg.model.freeze_layers
    return f"layers.{cut}" if cut < len(decoder.layers) else "norm"


def _history_residual(model: Any, history_ids: torch.Tensor | None) -> torch.Tensor | None:
    """`KarmaModel.history_residual` (B, N, d) of history_ids (B, N) (item index per token, -1
    elsewhere); None for a model without one."""
    if history_ids is None or not model.has_history_residual:
        return None
    return model.history_residual(history_ids)


@contextmanager
def _residual_added(decoder: torch.nn.Module, site: str | None, extra: torch.Tensor | None):
    """Within the block, the decoder adds extra (B, N, d) to the input of submodule `site`."""
    if site is None or extra is None:
        yield
        return

    def add(_module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0] + extra.to(args[0].dtype), *args[1:])

    handle = decoder.get_submodule(site).register_forward_pre_hook(add)
    try:
        yield
    finally:
        handle.remove()


def _run_decoder(
    decoder: torch.nn.Module,
    cache_kw: str,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past: list[tuple[torch.Tensor, torch.Tensor]] | None,
    site: str | None,
    extra: torch.Tensor | None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The HF decoder on the new tokens after the past key/values: hidden (B, N, d) and
    per-layer (keys, values) (B, h, P + N, hd)."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=past) if past is not None else None
    kwargs = {cache_kw: cache} if cache is not None else {}
    with _residual_added(decoder, site, extra):
        out = decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
    cache = cache if cache is not None else getattr(out, cache_kw)
    return out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers]


def _user_from_last(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """u from the last hidden state at <EMB>: (B, d) -> (B, k) float32."""
    rows = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return model.user_from_hidden(hidden[:, None, :], rows).float()


def _item_hidden(catalog: Any) -> torch.Tensor:
    return catalog.item_hidden


# ---- key/value caches ------------------------------------------------------------------------


@dataclass
class PrefixKV:
    """Key/values of a prompt prefix: `keys[l]`, `values[l]` are (heads, L, head_dim) per layer,
    `content` the content key of each of the L positions."""

    content: tuple[Hashable, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.content)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class LRU:
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, PrefixKV] = OrderedDict()

    def get(self, key: Hashable) -> PrefixKV | None:
        entry = self._data.get(key)
        if entry is not None:
            self._data.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: PrefixKV) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = entry
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def values(self) -> list[PrefixKV]:
        return list(self._data.values())

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self._data.values())


def _common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Request:
    ids: list[int]
    content: tuple[Hashable, ...]
    history: list[int]
    emb_position: int
    shared_end: int  # end of the text before the first history item (shared across users)
    past: PrefixKV | None = None
    reuse: int = 0


class FastUserEncoder:
    """User embeddings u with reused prefix key/values; equal to `plain_user_embeddings`.

    Not thread-safe: one thread (the server's batcher) owns an encoder. `stats` counts the
    tokens run and the tokens reused, so tests and benchmarks can see the caches work.
    runtime (serve.runtime): "torch" runs the decoder in torch; "onnx" and "onnx-int8" export
    it once and run it in ONNX Runtime with fp32 or int8 weights (karma/onnx_decoder.py), on
    num_threads intra-op threads (0 = one per physical core). The caches work alike: the past
    key/values go to ONNX Runtime as inputs and come back as outputs.
    """

    def __init__(
        self,
        model: Any,
        catalog: Any,
        item_texts: Sequence[str] | None = None,
        max_cached_users: int = 256,
        max_shared_prefixes: int = 64,
        runtime: str = "torch",
        num_threads: int = 0,
    ) -> None:
        if model.cfg.model.search_readout != "query":
            raise KarmaError(
                "model.search_readout=sum: the fast user path reads <EMB> only; serve this "
                "checkpoint with the plain forward (karma.inference.encode_users)"
            )
        self.model = model
        self.catalog = catalog
        self.item_texts = item_texts
        self.decoder = _decoder(model)
        self.cache_kw = cache_keyword(self.decoder)
        self.residual_site = _residual_site(model, self.decoder)
        self.onnx = None
        if runtime != "torch":
            from karma.onnx_decoder import OnnxDecoder

            self.onnx = OnnxDecoder(self.decoder, runtime, self.residual_site, num_threads)
        self.hist_id = _hist_token_id(model)
        self.users = LRU(max_cached_users)
        self.shared = LRU(max_shared_prefixes)
        self.stats = {"requests": 0, "tokens_run": 0, "tokens_reused": 0}

    def clear(self) -> None:
        self.users = LRU(self.users.capacity)
        self.shared = LRU(self.shared.capacity)

    def _request(self, history: Sequence[int], query: str) -> _Request:
        history = [int(i) for i in history]
        ids, emb_position = _prompt_ids(self.model, query, history, self.item_texts)
        content: list[Hashable] = []
        items = iter(history)
        first_item = emb_position
        for pos, token in enumerate(ids):
            if self.hist_id is not None and token == self.hist_id:
                content.append(("item", next(items)))
                first_item = min(first_item, pos)
            else:
                content.append(token)
        if emb_position != len(ids) - 1:
            raise ValueError("the user prompt must end at <EMB> (no target tokens at inference)")
        return _Request(ids, tuple(content), history, emb_position, shared_end=first_item)

    def _lookup(self, req: _Request, user_key: Hashable | None) -> None:
        # Reuse at most everything before <EMB>: its hidden state is what we need.
        limit = req.emb_position
        # Shared entries are few and short: scan them all, so the fixed text (`<bos> Query:`)
        # is reused even when the query itself is new.
        candidates = list(self.shared.values())
        if user_key is not None:
            candidates.append(self.users.get(user_key))
        for entry in candidates:
            if entry is None:
                continue
            n = min(_common_prefix(entry.content, req.content), limit)
            if n > req.reuse:
                req.past, req.reuse = entry, n

    @torch.inference_mode()
    def encode(
        self,
        histories: Sequence[Sequence[int]],
        queries: Sequence[str],
        user_keys: Sequence[Hashable | None] | None = None,
    ) -> torch.Tensor:
        """u (B, k) float32 on CPU; `user_keys[b]` names the per-user cache entry (None = the
        history itself, so an anonymous repeat still hits)."""
        if len(histories) != len(queries):
            raise ValueError(f"{len(histories)} histories but {len(queries)} queries")
        keys = list(user_keys) if user_keys is not None else [None] * len(histories)
        reqs = [self._request(h, q) for h, q in zip(histories, queries)]
        B = len(reqs)
        for req, key in zip(reqs, keys):
            self._lookup(req, key if key is not None else ("history", tuple(req.history)))
        hidden, kv = self._forward(reqs)
        for b, (req, key) in enumerate(zip(reqs, keys)):
            key = key if key is not None else ("history", tuple(req.history))
            full = PrefixKV(req.content[: req.emb_position], *self._row_kv(kv, reqs, b, B > 1))
            self.users.put(key, full)
            if self.shared.get(req.content[: req.shared_end]) is None:
                n = req.shared_end
                shared = PrefixKV(
                    req.content[:n], [k[:, :n] for k in full.keys], [v[:, :n] for v in full.values]
                )
                self.shared.put(shared.content, shared)
            self.stats["requests"] += 1
            self.stats["tokens_reused"] += req.reuse
            self.stats["tokens_run"] += len(req.ids) - req.reuse
        return _user_from_last(self.model, hidden).cpu()

    def _forward(self, reqs: list[_Request]) -> tuple[torch.Tensor, list]:
        """Run the new tokens of every request in one batch.

        Row b: past key/values left-padded to P = max reuse, new tokens right-padded to N. The
        2-D attention mask (B, P + N) hides both paddings; position ids continue each row's past,
        so every real token sees exactly what it sees in the plain forward.
        Returns the hidden state at <EMB> (B, d) and the per-layer (keys, values) (B, h, P+N, hd).
        """
        model = self.model
        device = model.device
        B = len(reqs)
        P = max(r.reuse for r in reqs)
        N = max(len(r.ids) - r.reuse for r in reqs)
        embeds, mask_rows, positions, item_rows = [], [], [], []
        for r in reqs:
            new_ids = torch.tensor([r.ids[r.reuse :]], dtype=torch.long)
            # the content key of a <HIST> position is ("item", item index)
            new_content = r.content[r.reuse :]
            new_items = [c[1] for c in new_content if isinstance(c, tuple)]
            item_rows.append([c[1] if isinstance(c, tuple) else -1 for c in new_content])
            hidden_rows = None
            if new_items:
                hidden_rows = _item_hidden(self.catalog)[torch.tensor(new_items)].to(device)
            emb = _input_embeds(model, new_ids, hidden_rows)[0]  # (n, d)
            n = emb.shape[0]
            embeds.append(torch.nn.functional.pad(emb, (0, 0, 0, N - n)))
            mask_rows.append([0] * (P - r.reuse) + [1] * (r.reuse + n) + [0] * (N - n))
            positions.append(list(range(r.reuse, r.reuse + N)))
            item_rows[-1] += [-1] * (N - n)
        inputs_embeds = torch.stack(embeds)  # (B, N, d)
        attention_mask = torch.tensor(mask_rows, dtype=torch.long, device=device)
        position_ids = torch.tensor(positions, dtype=torch.long, device=device)
        past = self._past(reqs, P, inputs_embeds.dtype, device) if P > 0 else None
        extra = None
        if self.hist_id is not None:
            history_ids = torch.tensor(item_rows, dtype=torch.long, device=device)
            extra = _history_residual(model, self.catalog.model_ids(history_ids))
        if self.onnx is not None:
            states, kv = self.onnx(inputs_embeds, position_ids, attention_mask, past, extra)
        else:
            states, kv = _run_decoder(
                self.decoder, self.cache_kw, inputs_embeds, attention_mask, position_ids, past,
                self.residual_site, extra,
            )
        last = torch.tensor([len(r.ids) - r.reuse - 1 for r in reqs], device=device)
        hidden = states[torch.arange(B, device=device), last]  # (B, d)
        return hidden, kv

    def _past(
        self, reqs: list[_Request], P: int, dtype: torch.dtype, device: Any
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the rows' cached (keys, values) left-padded to P: (B, h, P, hd) each."""
        n_layers = len(self.decoder.layers)
        data = []
        for layer in range(n_layers):
            ks, vs = [], []
            for r in reqs:
                if r.past is None:
                    ref = next(q.past for q in reqs if q.past is not None)
                    h, _, hd = ref.keys[layer].shape
                    k = v = torch.zeros(h, 0, hd, dtype=dtype, device=device)
                else:
                    k = r.past.keys[layer][:, : r.reuse]
                    v = r.past.values[layer][:, : r.reuse]
                if k.shape[1] < P:
                    pad = (0, 0, P - k.shape[1], 0)  # left padding along the sequence axis
                    k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
                ks.append(k)
                vs.append(v)
            data.append((torch.stack(ks), torch.stack(vs)))
        return data

    @staticmethod
    def _row_kv(
        kv: list, reqs: list[_Request], b: int, copy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row b's key/values before <EMB>, without padding: (h, emb_position, hd) per layer.

        Its past (left-padded) and new tokens are adjacent, so this is one slice; a view for a
        batch of one, a copy otherwise (a view would keep the whole batch's tensors alive)."""
        r = reqs[b]
        P = max(q.reuse for q in reqs)
        span = slice(P - r.reuse, P + r.emb_position - r.reuse)
        keys = [k[b, :, span] for k, _ in kv]
        values = [v[b, :, span] for _, v in kv]
        if copy:
            keys, values = [k.clone() for k in keys], [v.clone() for v in values]
        return keys, values
