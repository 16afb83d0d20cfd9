"""Dense next-item training over whole user sequences (`train.objective=sequence`).

    sequences = UserSequences.build(model, data, cfg)      # cached lower-layer states per user
    objective = SequenceObjective(model, cfg.loss, image_features=feats)  # feats: karma_mm
    out = objective(sequences.batch(model, rows))          # {"loss", "act_loss", ...}

Every position of a user's training sequence is a readout: u_t = normalize(W_u h_t) at history
token x_t must rank x_{t+1} first over the whole catalog (`CatalogSoftmaxLoss`), as SASRec and
HLLM train. One forward over n items gives n - 1 examples where the prompt objective gives one.
By default a user gives its newest train.sequence_max_len + 1 training items;
train.sequence_windows=all cuts the whole training part into windows of that length, so every
training transition is a readout target, as in SASRec (`karma.split.training_windows`).
Inference is unchanged: a query-less prompt `<bos> History: x_1 .. x_n` read at x_n
(`model.readout=history`) is exactly the last readout, run through the whole LLM.

With queries (data.query_mode other than none, `model.prompt_layout=history_first`) each user
of a batch also gives `train.search_examples` search examples (default one): a cut c drawn per
step, at least `train.search_min_history` items long where the sequence allows, the prompt
`<bos> History: x_1 .. x_c Query: q_{c+1} <EMB>` with the query of x_{c+1}'s training example,
read at <EMB> and scored against the catalog like the dense readouts. The dense readouts stay
query-less, so one checkpoint serves recommendation (no query, read at the last history token)
and search (read after the query); act_loss weighs the two tasks equally. The search example is
exactly the inference prompt: its query tokens attend to the history in every layer, so the
frozen lower layers' key/values of each user sequence are cached at setup too (bf16, about
1 MB per user of 50 items on SmolLM2) and a step runs the lower layers on the query tokens only.
The top layers too: the query tokens are packed behind their user's dense row, whose states of
x_1 .. x_c are the search prompt's (causal attention), and a 4D mask lets them see only those
(`pack_search_examples`), so the history is not run through the top layers once per example.

Compute. The lower `model.freeze_layers` layers are frozen and so is everything below them (P_h,
the catalog statistics, the item tower, which runs with the LoRA adapters off), so their output
for each user sequence is computed once at setup and cached (bf16); a step runs only the
trainable top layers. Item states come from the same frozen item tower (`model.history_cache`).
With an image token (model.image_fusion token/both) each item's state reads it too, so the image
projection is frozen with the tower, at its random start: the catalog inference encodes is the one
training cached. The late image maps (model.image_fusion late/both) are added to e_i and, entering
the first trainable layer, to each history token, so there the image path learns.

Knowledge regularizers on the last readout of each user (target x_n, the last training item):
- L_gen: " Next: {x_n text}<eos>" follows x_{n-1}. Its tokens pass the frozen lower layers on
  their own (positions continuing the sequence) and meet the history in the trainable top layers,
  which are the only layers that can learn anything here.
- L_rec: R(u_{n-1}) then x_n's text, a second pass through the whole LLM, as in the prompt
  objective.
L_img (karma_mm) is cheap enough for every readout: g(u_t) regresses the frozen image features of
x_{t+1} at each dense readout and of the target at each search example (MSE, mean over readouts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from karma.atomic import write_tensor_atomic
from karma.batching import IGNORE_INDEX, pad_sequences
from karma.config import Config, ConfigError, LossConfig
from karma.errors import DataError
from karma.inference import check_image_features
from karma.losses import (
    ActionLoss,
    CatalogSoftmaxLoss,
    TokenCrossEntropy,
    candidates_softmax_loss,
    loss_weights,
)
from karma.model import KarmaModel
from karma.objective import reconstruction_loss
from karma.sequence_cache import (
    cache_dir,
    cache_key,
    load_or_compute,
    lower_states,
    suffix_states,
)
from karma.split import category_matrix, query_items, training_windows


def check_sequence_config(cfg: Config) -> None:
    """What train.objective=sequence needs, checked before any work."""
    m = cfg.model
    problems = []
    if cfg.data.query_mode != "none" and m.prompt_layout != "history_first":
        problems.append(
            "model.prompt_layout=history_first with a query (the query must follow the history, "
            "so the dense readouts before it stay query-less)"
        )
    if m.interface != "continuous":
        problems.append("model.interface=continuous")
    if m.readout != "history":
        problems.append("model.readout=history (inference must read where training did)")
    if m.history_source != "cache":
        problems.append("model.history_source=cache (the frozen item tower's states)")
    if m.lora and m.train_item_tower:
        problems.append("model.train_item_tower=false (catalog states must not drift)")
    if problems:
        raise ConfigError("train.objective=sequence needs " + "; ".join(problems))


@dataclass
class UserSequences:
    """Training sequences x_1..x_n, one per window of a user's training part (up to
    train.sequence_max_len + 1 items; the newest window only, or every transition with
    train.sequence_windows=all), and the residual stream entering layer model.freeze_layers for
    the input tokens `<bos> History: x_1 .. x_{n-1}` (x_n is only ever a target). "User" below
    means one such window: a user with a long training part gives several rows."""

    items: list[list[int]]  # per user, oldest first, n >= 2
    states: list[torch.Tensor]  # per user (P + n - 1, d) bf16 on CPU
    prefix_len: int  # P: tokens before the first history token
    # L_gen on: per user, the lower states of " Next: {x_n text}<eos>" (positions continuing the
    # sequence), appended to the user's states; None when the preset has no L_gen
    suffix_states: list[torch.Tensor] | None
    target_ids: list[list[int]]  # per user, tokens of x_n's text + eos (L_gen / L_rec)
    # per user, the query of each readout target x_2 .. x_n (from the training examples), and
    # the frozen lower layers' key/values of the input tokens, (L, 2, h, P + n - 1, hd) bf16;
    # None without queries
    queries: list[list[str]] | None = None
    lower_kv: list[torch.Tensor] | None = None
    # with queries: which item has which category, (N, C) bool, and each category's column
    # (lowercased name), for the query's candidate set (loss.query_candidates_weight)
    item_categories: np.ndarray | None = None
    category_columns: dict[str, int] | None = None
    # with queries: search examples per user and step, and the fewest history items one sees
    # (train.search_examples, train.search_min_history)
    search_examples: int = 1
    search_min_history: int = 1

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    @torch.no_grad()
    def build(cls, model: KarmaModel, data: Any, cfg: Config, progress: bool = True):
        """From the valid split's `seen` (each user's whole training part, in order); the lower
        pass is cached on disk under $KARMA_HOME/sequence_cache, keyed by everything it reads."""
        max_len = cfg.train.sequence_max_len
        last_only = cfg.train.sequence_windows == "last"
        valid = data.split("valid")
        # one row per training window (train.sequence_windows): (user, where the window starts
        # in the user's training part, its items); the start finds its targets' queries
        users = [
            (u, start, seq[start:end])
            for u, s in zip(valid.user_ids, valid.seen)
            for seq in [list(map(int, s))]
            for start, end in training_windows(len(seq), max_len, last_only)
        ]
        if not users:
            raise DataError("train.objective=sequence: no user has 2 training items")
        items = [s for _, _, s in users]
        prompt = model.prompt
        prefix = prompt.bos + prompt.history_first_ids
        x_all = model.history_proj(model.condition(model.history_cache))  # (N, d) history tokens
        key = cache_key(cfg, prefix, x_all, items)
        path, kv_path = cache_dir() / f"{key}.pt", cache_dir() / f"{key}-kv.pt"
        # with queries the lower layers' key/values are kept too (search examples), from the
        # same pass
        with_kv = cfg.data.query_mode != "none"

        def lower_pass(keep_kv: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
            return lower_states(
                model, prefix, x_all, items, cfg.eval.batch_size, progress, keep_kv
            )

        kv = None
        if with_kv and not (path.exists() and kv_path.exists()):
            states, kv = lower_pass(keep_kv=True)
            write_tensor_atomic(path, states)
            write_tensor_atomic(kv_path, kv)
        else:
            states = load_or_compute(path, lambda: lower_pass(keep_kv=False)[0])
            if with_kv:
                kv = torch.load(kv_path, weights_only=True)
        lambda_gen, lambda_rec, _ = loss_weights(cfg.loss)
        target_ids = [prompt.target(data.items.texts[s[-1]]) for s in items]
        suffixes = None
        if lambda_gen > 0:  # " Next: {x_n text}<eos>" is as fixed as the history: cached too
            h = hashlib.sha256(key.encode())
            for t in target_ids:
                h.update(np.asarray(prompt.next_ids + list(t), dtype=np.int64).tobytes())
            starts = [st.shape[0] for st in states]
            suffixes = load_or_compute(
                cache_dir() / f"{h.hexdigest()[:24]}-next.pt",
                lambda: suffix_states(model, target_ids, starts, cfg.eval.batch_size, progress),
            )
        queries = _target_queries(data.split("train"), users) if with_kv else None
        cats, columns = category_matrix(data.items.categories) if with_kv else (None, None)
        return cls(items, states, len(prefix), suffixes, target_ids, queries, kv, cats, columns,
                   cfg.train.search_examples, cfg.train.search_min_history)

    def item_frequency(self, n_items: int) -> torch.Tensor:
        """How often each item is a readout target: the proposal of sampled catalog softmax."""
        counts = np.zeros(n_items)
        for seq in self.items:
            np.add.at(counts, seq[1:], 1)
        return torch.as_tensor(counts + 1.0)  # every item keeps a chance to be sampled

    def batch(
        self, model: KarmaModel, rows: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors for SequenceObjective: users `rows`, padded on the right.

        states (B, T, d) residual stream at the cut (with " Next: target" appended when L_gen is
        on), attention_mask (B, T), history_ids (B, T) item per history token (-1 elsewhere),
        readout_rows / readout_cols / readout_targets (R,) every dense readout, last_cols (B,)
        the last readout of each user, user_labels (B, T) (L_gen), rec_* (L_rec, built by
        the objective from target_ids). With queries, query_* (`search_examples` search
        examples per user, each cut drawn from `generator`; see `_query_examples`)."""
        rows = [int(r) for r in rows]
        device = model.device
        d = self.states[rows[0]].shape[1]
        gen = self.suffix_states is not None
        lengths = [
            self.states[r].shape[0] + (self.suffix_states[r].shape[0] if gen else 0) for r in rows
        ]
        width = max(lengths)
        states = torch.zeros(len(rows), width, d)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        history_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        r_rows, r_cols, r_targets, last_cols = [], [], [], []
        P = self.prefix_len
        for b, r in enumerate(rows):
            seq, st = self.items[r], self.states[r]
            n_in = len(seq) - 1
            states[b, : st.shape[0]] = st.float()
            mask[b, : lengths[b]] = 1
            history_ids[b, P : P + n_in] = torch.tensor(seq[:-1])
            r_rows += [b] * n_in
            r_cols += list(range(P, P + n_in))
            r_targets += seq[1:]
            last_cols.append(P + n_in - 1)
            if gen:
                states[b, st.shape[0] : lengths[b]] = self.suffix_states[r].float()
                next_len = lengths[b] - st.shape[0] - len(self.target_ids[r])
                labels[b, st.shape[0] + next_len : lengths[b]] = torch.tensor(self.target_ids[r])
        batch = {
            "states": states,
            "attention_mask": mask,
            "history_ids": history_ids,
            "readout_rows": torch.tensor(r_rows),
            "readout_cols": torch.tensor(r_cols),
            "readout_targets": torch.tensor(r_targets),
            "last_cols": torch.tensor(last_cols),
            "rows": torch.tensor(rows),
        }
        if gen:
            batch["user_labels"] = labels
        out: dict[str, Any] = {k: v.to(device) for k, v in batch.items()}
        out["rec_targets"] = [self.target_ids[r] for r in rows]
        if self.queries is not None:
            out.update(self._query_examples(model, rows, generator))
        return out

    @torch.no_grad()
    def _query_examples(
        self, model: KarmaModel, rows: list[int], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """`search_examples` search examples per user: a cut c uniform in [min(m, n - 1), n - 1]
        (m = `search_min_history`), history x_1 .. x_c, the query and target of x_{c+1}. The
        tokens after x_c (" Query: q <EMB>") run the frozen lower layers against the cached
        key/values of the first P + c tokens (left-padded). Their top layers run later, packed
        behind their user's dense row (`pack_search_examples`), so the history is not run
        through the top layers again. E = B * search_examples, a user's examples adjacent:
        -> query_lower (E, Q, d) those tokens' residual stream entering the first trainable
        layer (right-padded), query_lengths (E,), query_rows (E,) the user's row of the batch,
        query_history_end (E,) (x_c's position, P + c - 1), query_targets (E,), query_allowed
        (E, N) bool (the query's candidates: items with every category it names; None without
        categories)."""
        from transformers import DynamicCache

        P, device = self.prefix_len, model.device
        cuts, new_ids, targets, examples, batch_rows = [], [], [], [], []
        for b, r in enumerate(rows):
            seq = self.items[r]
            low = min(self.search_min_history, len(seq) - 1)
            for _ in range(self.search_examples):
                cut = int(torch.randint(low, len(seq), (1,), generator=generator))
                ids = model.prompt.user(self.queries[r][cut - 1], n_history=cut)[0]
                cuts.append(cut)
                new_ids.append(ids[P + cut :])  # everything after the last history token
                targets.append(seq[cut])
                examples.append(r)
                batch_rows.append(b)
        rows = examples
        past_len = P + max(cuts)
        kv = torch.stack(
            [
                F.pad(self.lower_kv[r][..., : P + c, :], (0, 0, past_len - P - c, 0))
                for r, c in zip(rows, cuts)
            ]
        ).to(device=device, dtype=torch.float32)  # (E, L, 2, h, past_len, hd), left-padded
        past = DynamicCache(ddp_cache_data=[(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])])
        ids, new_mask, _ = pad_sequences(new_ids, model.prompt.pad_id)
        past_mask = torch.tensor([[0] * (past_len - P - c) + [1] * (P + c) for c in cuts])
        lower = model.run_lower(
            model.embed_tokens(ids.to(device)),
            torch.cat([past_mask, new_mask], dim=1).to(device),
            past=past,
        )  # (E, Q, d)
        allowed = None
        if self.item_categories is not None:  # the query's candidates: every named category
            allowed = torch.ones(len(rows), self.item_categories.shape[0], dtype=torch.bool)
            for b, (r, c) in enumerate(zip(rows, cuts)):
                query = self.queries[r][c - 1]
                allowed[b] = torch.from_numpy(
                    query_items(self.item_categories, self.category_columns, query)
                )
                allowed[b, targets[b]] = True
            allowed = allowed.to(device)
        return {
            "query_allowed": allowed,
            "query_lower": lower.float(),
            "query_lengths": torch.tensor([len(n) for n in new_ids], device=device),
            "query_rows": torch.tensor(batch_rows, device=device),
            "query_history_end": torch.tensor([P + c - 1 for c in cuts], device=device),
            "query_targets": torch.tensor(targets, device=device),
        }


def pack_search_examples(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    query_lower: torch.Tensor,
    query_lengths: torch.Tensor,
    query_rows: torch.Tensor,
    history_end: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One top-layer pass for the dense rows and their search examples: each example's query
    tokens are appended to its user's row and see, through a 4D mask, that row's history up to
    x_c (position `history_end`) and their own earlier tokens only, at the positions they have
    in `<bos> History: x_1 .. x_c Query: q <EMB>`. Causal attention makes the states of
    x_1 .. x_c the same in the dense row as in the search prompt, so this equals running each
    search prompt on its own (tested against the whole-LLM inference path) without running
    the history through the top layers once per example.

    hidden (B, T, d) and attention_mask (B, T) the dense rows (right-padded), query_lower
    (E, Q, d), query_lengths / query_rows / history_end (E,) -> hidden (B, T + Q', d), mask
    (B, 1, T + Q', T + Q') bool, position_ids (B, T + Q'), emb_cols (E,) each example's <EMB>.
    """
    B, T, d = hidden.shape
    device = hidden.device
    lengths, rows, ends = query_lengths.tolist(), query_rows.tolist(), history_end.tolist()
    starts, used = [], [T] * B
    for b, n in zip(rows, lengths):
        starts.append(used[b])
        used[b] += n
    width = max(used)
    block = hidden.new_zeros(B, width - T, d)
    positions = torch.zeros(B, width, dtype=torch.long, device=device)
    positions[:, :T] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = torch.zeros(B, width, width, dtype=torch.bool, device=device)
    allowed[:, :T, :T] = causal[:T, :T] & attention_mask.bool()[:, None, :]
    for e, (b, s, n, h) in enumerate(zip(rows, starts, lengths, ends)):
        block[b, s - T : s - T + n] = query_lower[e, :n].to(block.dtype)
        allowed[b, s : s + n, : h + 1] = True  # the history through x_c
        allowed[b, s : s + n, s : s + n] = causal[:n, :n]
        positions[b, s : s + n] = torch.arange(h + 1, h + 1 + n, device=device)
    # padding positions attend to themselves: no softmax over an empty row
    allowed |= torch.eye(width, dtype=torch.bool, device=device)
    emb_cols = torch.tensor([s + n - 1 for s, n in zip(starts, lengths)], device=device)
    return torch.cat([hidden, block], dim=1), allowed[:, None], positions, emb_cols


class SequenceObjective(nn.Module):
    """The losses of a `UserSequences.batch`: dense catalog softmax (act_loss) plus the
    preset's L_gen / L_rec on each user's last readout and L_img on every readout. Frozen here:
    P_h, <ITEM>/<EMB>, the image projection, R when the preset has no L_rec and g when it has no
    L_img (see the module docstring for why).

    image_features (N, image_dim): the catalog's frozen image features, rows as
    `model.history_cache` (the targets of L_img; needed only when the preset trains it)."""

    def __init__(
        self,
        model: KarmaModel,
        cfg: LossConfig,
        proposal: torch.Tensor | None = None,
        image_features: np.ndarray | torch.Tensor | None = None,
    ):
        super().__init__()
        self.lambda_gen, self.lambda_rec, self.lambda_img = loss_weights(cfg)
        self.rec_users = cfg.rec_users
        self.query_candidates_weight = cfg.query_candidates_weight
        image_dim = model.cfg.model.image_dim
        if self.lambda_img > 0 and image_dim <= 0:
            raise ConfigError(
                f"loss.preset={cfg.preset} regresses image features but model.image_dim is 0"
            )
        self.model = model
        # A plain attribute, not a buffer: data, not state, so checkpoints do not carry it.
        self.image_features = None
        if self.lambda_img > 0:
            n_items = model.history_cache.shape[0]
            self.image_features = check_image_features(model, image_features, n_items).to(
                model.device
            )  # (N, D) float32
        # Only the temperature of ActionLoss is used: one learnable, clamped tau for both
        # objectives, saved under the same name.
        self.action_loss = ActionLoss(
            cfg.temperature, cfg.temperature_min, cfg.temperature_max, cfg.learn_temperature
        )
        self.catalog_loss = CatalogSoftmaxLoss(cfg.catalog_samples, proposal)
        self.token_loss = TokenCrossEntropy()
        model.history_proj.requires_grad_(False)
        model.special_embeds.requires_grad_(False)
        if model.cfg.model.image_token:
            # The image token reaches the item states through the image projection once, at
            # setup, without gradients: the history cache and every user's lower states are
            # never refreshed, so the projection must stay as it was then (encode_catalog runs
            # it again at inference), and a trainable parameter without a gradient would break
            # DDP (find_unused_parameters=False). The late image maps (model.image_fusion
            # late/both) join after the frozen parts and train.
            model.image_proj.requires_grad_(False)
        if image_dim > 0 and self.lambda_img == 0:
            model.image_head.requires_grad_(False)
        if self.lambda_rec == 0:
            model.rec_head.requires_grad_(False)
            model.rec_norm.requires_grad_(False)

    def top_pass(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trainable top layers over a `UserSequences.batch`: the dense rows' last hidden
        states (B, T, d) and, with queries, the search examples' u (E, k), from one pass with
        the examples packed behind their rows (`pack_search_examples`)."""
        model = self.model
        cut = model.cfg.model.freeze_layers
        mask = batch["attention_mask"]
        hidden = batch["states"]
        if model.has_history_residual:
            hidden = hidden + model.history_residual(batch["history_ids"]).to(hidden.dtype)
        if "query_lower" not in batch:
            return model.run_from_layer(hidden, mask, cut), None
        T = hidden.shape[1]
        packed, mask4, positions, emb_cols = pack_search_examples(
            hidden, mask, batch["query_lower"], batch["query_lengths"], batch["query_rows"],
            batch["query_history_end"],
        )
        base = model.base_lm
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
        if base.config._attn_implementation != "sdpa":
            # eager attention adds its mask to the scores: 0 where allowed, the dtype's min else
            mask4 = torch.zeros(mask4.shape, dtype=packed.dtype, device=packed.device).masked_fill(
                ~mask4, torch.finfo(packed.dtype).min
            )
        packed = model.run_from_layer(packed, mask4, cut, position_ids=positions)
        query_emb = model.user_from_hidden(
            packed[batch["query_rows"]], emb_cols, batch["query_history_end"]
        )  # (E, k)
        return packed[:, :T], query_emb

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model = self.model
        hidden, query_emb = self.top_pass(batch)  # (B, T, d), (E, k) | None
        rows, cols = batch["readout_rows"], batch["readout_cols"]
        readout = F.normalize(model.user_proj(hidden[rows, cols]).float(), dim=-1)  # (R, k)
        n_items = model.history_cache.shape[0]
        catalog_emb = model.item_embedding(
            model.history_cache, torch.arange(n_items, device=model.device)
        )  # (N, k)
        temperature = self.action_loss.temperature
        out = {
            "act_loss": self.catalog_loss(
                readout, catalog_emb, batch["readout_targets"], temperature
            ),
            "temperature": temperature.detach(),
        }
        # L_img reads u at every readout: the dense ones, then the search examples
        img_users, img_targets = [readout], [batch["readout_targets"]]
        if query_emb is not None:
            out["query_act_loss"], search = self._query_loss(
                batch, query_emb, catalog_emb, temperature
            )
            img_users.append(query_emb)
            img_targets.append(batch["query_targets"])
            if self.query_candidates_weight > 0:
                out["query_candidates_loss"] = search
                search = out["query_act_loss"] + self.query_candidates_weight * search
            else:
                search = out["query_act_loss"]
            out["act_loss"] = (out["act_loss"] + search) / 2
        zero = readout.new_zeros(())
        lm_head = model.base_lm.get_output_embeddings()
        out["gen_loss"] = zero
        if self.lambda_gen > 0:
            out["gen_loss"] = self.token_loss(hidden, batch["user_labels"], lm_head)
        out["rec_loss"] = zero
        if self.lambda_rec > 0:
            # The reconstruction pass runs the whole LLM (gradients reach u through every
            # layer): on the first rec_users users of the batch only (batches are random).
            k = self.rec_users or len(batch["rec_targets"])
            user_emb = model.user_from_hidden(hidden[:k], batch["last_cols"][:k])  # (k, d_emb)
            out["rec_loss"] = self._rec_loss(user_emb, batch["rec_targets"][:k])
        loss = (
            out["act_loss"] + self.lambda_gen * out["gen_loss"] + self.lambda_rec * out["rec_loss"]
        )
        if model.cfg.model.image_dim > 0:
            out["img_loss"] = zero
            if self.lambda_img > 0:
                pred = model.image_head(torch.cat(img_users)).float()  # (R + E, D)
                target = self.image_features[torch.cat(img_targets)]  # (R + E, D)
                # Mean over readouts and feature dims, as the prompt objective: scale-free in D.
                out["img_loss"] = F.mse_loss(pred, target)
            loss = loss + self.lambda_img * out["img_loss"]
        out["loss"] = loss
        return out

    def _query_loss(
        self,
        batch: dict[str, torch.Tensor],
        user_emb: torch.Tensor,
        catalog_emb: torch.Tensor,
        temperature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Catalog softmax of the search examples' u (E, k), read at <EMB> after the query, and
        (with loss.query_candidates_weight) the softmax over the query's candidates only."""
        full = self.catalog_loss(user_emb, catalog_emb, batch["query_targets"], temperature)
        if self.query_candidates_weight == 0 or batch.get("query_allowed") is None:
            return full, None
        candidates = candidates_softmax_loss(
            user_emb, catalog_emb, batch["query_targets"], temperature, batch["query_allowed"]
        )
        return full, candidates

    def _rec_loss(self, user_emb: torch.Tensor, rec_targets: list[list[int]]) -> torch.Tensor:
        model = self.model
        rec = [model.prompt.rec(t) for t in rec_targets]
        ids, mask, _ = pad_sequences([r[0] for r in rec], model.prompt.pad_id)
        labels, _, _ = pad_sequences([r[1] for r in rec], IGNORE_INDEX)
        device = model.device
        return reconstruction_loss(
            model, user_emb, ids.to(device), mask.to(device), labels.to(device), self.token_loss
        )


def _target_queries(train: Any, users: list[tuple[str, int, list[int]]]) -> list[list[str]]:
    """Per window (user, start, x_1 .. x_n), the query of each readout target x_2 .. x_n: the
    queries of the user's training examples start .. start + n - 2, whose targets these items
    are (checked; example k of a user has the user's training item k + 1 as its target)."""
    by_user: dict[str, list[int]] = {}
    for row, user in enumerate(train.user_ids):
        by_user.setdefault(user, []).append(row)
    out = []
    for user, start, seq in users:
        rows = by_user.get(user, [])[start : start + len(seq) - 1]
        if [int(train.targets[r]) for r in rows] != seq[1:]:
            raise DataError(
                f"user {user!r}: the training examples' targets do not match the training "
                "sequence (prepared data out of date? run karma data prepare again)"
            )
        out.append([train.queries[r] for r in rows])
    return out
