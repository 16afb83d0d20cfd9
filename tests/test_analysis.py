"""Attention-sink and fidelity metrics on hand-built tensors; greedy decoding on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from karma.analysis import attention as A
from karma.analysis import fidelity as F
from karma.inference import greedy_decode


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~20x faster on one thread than on two contended ones (measured on the
    shared 2-core CI box: 14 ms vs 280 ms per L_rec step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(rows: list[list[float]]) -> torch.Tensor:
    """One layer, one head, B users, one query: (L=1, H=1, B, Q=1, K)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None, :, None, :]


# ---------------------------------------------------------------- shapes and gathering


def test_to_lhbqk_from_hf_layers_matches_manual_permute():
    layers = [torch.rand(3, 2, 5, 5) for _ in range(4)]  # (B, H, Q, K) per layer
    attn = A.to_lhbqk(layers)
    assert attn.shape == (4, 2, 3, 5, 5)
    assert torch.equal(attn[2, 1, 0], layers[2][0, 1])


def test_select_queries_and_gather_keys_with_padding():
    attn = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 1, 2, 4, 4)  # (1, 1, B=2, 4, 4)
    rows = A.select_queries(attn, torch.tensor([3, 2]))  # (1, 1, 2, 4)
    assert torch.equal(rows[0, 0, 0], attn[0, 0, 0, 3])
    assert torch.equal(rows[0, 0, 1], attn[0, 0, 1, 2])
    hist = A.gather_keys(rows, torch.tensor([[1, 2], [0, -1]]))  # (1, 1, 2, 2)
    assert hist[0, 0].tolist() == [[13.0, 14.0], [24.0, 0.0]]
    assert A.gather_keys(rows, torch.tensor([0, 3]))[0, 0].tolist() == [12.0, 27.0]


# ---------------------------------------------------------------- sink rate


def test_all_attention_on_first_token_gives_full_sink_rate_and_zero_entropy():
    L, H, B, T = 3, 2, 4, 6
    attn = torch.zeros(L, H, B, T, T)
    attn[..., 0] = 1.0  # every query puts all mass on key 0
    scores = A.key_attention(attn, torch.zeros(B, dtype=torch.long))
    assert A.sink_rate(scores, eps=0.3) == 1.0
    assert A.sink_rate_per_layer(scores).tolist() == [1.0, 1.0, 1.0]
    emb = A.select_queries(attn, torch.full((B,), T - 1))
    history_positions = torch.tensor([[1, 2, 3, 4]] * B)
    hist = A.gather_keys(emb, history_positions)
    assert torch.equal(A.history_entropy(hist, history_positions >= 0), torch.zeros(L, H))
    assert A.gather_keys(emb, torch.zeros(B, dtype=torch.long)).mean() == 1.0


def test_uniform_attention_gives_zero_sink_rate_and_log_n_entropy():
    L, H, B, n = 2, 3, 5, 8
    hist = torch.full((L, H, B, n), 1.0 / (n + 2))  # uniform over n history + 2 other keys
    mask = torch.ones(B, n, dtype=torch.bool)
    assert torch.allclose(A.history_entropy(hist, mask), torch.full((L, H), math.log(n)))
    assert torch.allclose(A.history_entropy(hist, mask, normalized=True), torch.ones(L, H))
    scores, _ = A.history_sink_scores(hist, mask)
    assert A.sink_rate(scores, eps=0.3) == 0.0


def test_sink_rate_hand_computed_mixture_and_query_mask():
    # Layer 0: head 0 mean attention to key 0 = (0.5 + 0.1) / 2 = 0.3 (not > 0.3), head 1 = 0.8.
    # Layer 1: both heads 0.0. Sink rate = 1 / 4.
    attn = torch.zeros(2, 2, 2, 1, 3)
    attn[0, 0, :, 0, 0] = torch.tensor([0.5, 0.1])
    attn[0, 1, :, 0, 0] = torch.tensor([0.8, 0.8])
    scores = A.key_attention(attn, 0)
    assert torch.allclose(scores, torch.tensor([[0.3, 0.8], [0.0, 0.0]]))
    assert A.sink_rate(scores, eps=0.3) == 0.25
    assert A.sink_rate_per_layer(scores, eps=0.3).tolist() == [0.5, 0.0]
    # Masking out user 1's query leaves head 0 at 0.5 -> a sink.
    masked = A.key_attention(attn, 0, query_mask=torch.tensor([[True], [False]]))
    assert A.sink_rate(masked, eps=0.3) == 0.5


def test_history_sink_uses_most_attended_slot_over_users_that_have_it():
    hist = torch.tensor([[0.1, 0.6, 0.0], [0.2, 0.4, 0.9]])[None, None]  # (1, 1, B=2, n=3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scores, slots = A.history_sink_scores(hist, mask)
    # slot means: (0.1+0.2)/2 = 0.15, (0.6+0.4)/2 = 0.5, 0.9/1 = 0.9 -> slot 2
    assert slots.item() == 2 and scores.item() == pytest.approx(0.9)


def test_entropy_renormalizes_over_history_hand_computed():
    # Mass 0.2 and 0.2 on two slots (0.6 elsewhere): renormalized (0.5, 0.5) -> log 2.
    hist = torch.tensor([[0.2, 0.2, 0.0]])[None, None]
    mask = torch.tensor([[True, True, False]])
    assert A.history_entropy(hist, mask).item() == pytest.approx(math.log(2))
    p = torch.tensor([[0.1, 0.3, 0.6]])[None, None]
    expected = -(0.1 * math.log(0.1) + 0.3 * math.log(0.3) + 0.6 * math.log(0.6))
    entropy = A.history_entropy(p, torch.ones(1, 3, dtype=torch.bool))
    assert entropy.item() == pytest.approx(expected)


# ---------------------------------------------------------------- concentration


def test_gini_extremes_and_hand_value():
    assert A.gini(torch.ones(5)).item() == pytest.approx(0.0)
    assert A.gini(torch.tensor([0.0, 0.0, 0.0, 4.0])).item() == pytest.approx(3 / 4)
    # x = (1, 2, 3): sum_i (2i - n - 1) x_i = -2*1 + 0*2 + 2*3 = 4; 4 / (3 * 6) = 2/9
    assert A.gini(torch.tensor([3.0, 1.0, 2.0])).item() == pytest.approx(2 / 9)
    assert A.gini(torch.zeros(3)).item() == 0.0


def test_column_concentration_barcode_vs_diagonal():
    B, n = 4, 4
    mask = torch.ones(B, n, dtype=torch.bool)
    barcode = torch.zeros(1, 1, B, n)
    barcode[..., 2] = 0.5  # every user attends slot 2: one vertical strip
    c = A.column_concentration(barcode, mask)
    assert c["top1_share"].item() == pytest.approx(1.0)
    assert c["gini"].item() == pytest.approx(3 / 4)
    diagonal = torch.eye(n)[None, None] * 0.7  # each user a different slot
    c = A.column_concentration(diagonal, mask)
    assert c["top1_share"].item() == pytest.approx(1 / n)
    assert c["gini"].item() == pytest.approx(0.0)


# ---------------------------------------------------------------- frequency correlation


def test_rankdata_ties_and_spearman():
    assert A.rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert A.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert A.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Pearson of ranks (1,2,3) vs (1,3,2) = 0.5
    assert A.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(A.spearman([1, 1, 1], [1, 2, 3]))


def test_frequency_correlation_detects_id_shortcut():
    # Items 0..3 with frequency 1..4; attention to an item proportional to its frequency.
    items = torch.tensor([[0, 1, 2, 3], [3, 2, -1, -1]])
    mask = items >= 0
    freq = np.array([1, 2, 3, 4, 0])
    hist = (items + 1).clamp(min=0).float()[None, None] / 10  # (1, 1, 2, 4)
    rho = A.frequency_correlation(hist, mask, items, freq)
    assert rho.shape == (1,) and rho[0] == pytest.approx(1.0)
    mean_attn, counts = A.item_attention(hist, mask, items, 5)
    assert counts.tolist() == [1, 1, 2, 2, 0]
    # user 0 renormalized: (1,2,3,4)/10; user 1: (4,3)/7 -> item 3 mean = (0.4 + 4/7) / 2
    assert mean_attn[0, 3].item() == pytest.approx((0.4 + 4 / 7) / 2)


# ---------------------------------------------------------------- text metrics


def test_text_metrics_hand_values():
    assert F.normalize_tokens("Toy Story (1995) | Children's") == [
        "toy",
        "story",
        "1995",
        "children",
        "s",
    ]
    assert F.token_f1("toy story", "Toy Story (1995)") == pytest.approx(2 * 1 * (2 / 3) / (5 / 3))
    assert F.token_f1("", "") == 1.0 and F.token_f1("a", "") == 0.0
    assert F.lcs_length("a b c d".split(), "a c x d".split()) == 3
    # LCS(story toy, toy story 1995) = 1 -> P = 1/2, R = 1/3, F = 0.4; token F1 sees 2 overlaps.
    assert F.rouge_l("story toy", "toy story 1995") == pytest.approx(0.4)
    assert F.token_f1("story toy", "toy story 1995") == pytest.approx(0.8)
    assert F.exact_match("Toy  story!", "toy story") == 1.0
    assert F.genre_match("Alien (1979) | Horror, Sci-Fi", ["Sci-Fi", "Drama"]) == (True, False)
    assert F.genre_match("kids: children s comedy", ["Children's", "Comedy"]) == (True, True)
    m = F.text_metrics(["a b", "c"], ["a b", "d"], [["A"], []])
    assert m["exact_match"] == 0.5 and m["genre_any"] == 1.0 and m["genre_all"] == 1.0


def test_target_ranks_pessimistic_ties_and_rank_metrics():
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ranks = F.catalog_ranks(query, items, torch.tensor([0, 3]))
    assert ranks.tolist() == [1, 1]  # item 2 ties item 0 and counts ahead; item 1 beats item 3
    m = F.rank_metrics(np.array([0, 3, 19]))  # 0-based, as karma.metrics.target_ranks
    assert m["text_query_rank_median"] == 4.0
    assert m["text_query_mrr"] == pytest.approx((1 + 0.25 + 0.05) / 3)
    assert m["text_query_hr@10"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- greedy decoding


def test_greedy_decode_round_trips_overfit_soft_prefixes(tiny_backbone):
    """Train one soft prefix per text (and the model) until greedy decoding reproduces each."""
    backbone, tokenizer = tiny_backbone
    texts = [
        "Toy Story (1995) | Animation",
        "Heat (1995) | Action, Crime",
        "Fargo (1996) | Crime, Drama",
    ]
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    T = max(len(seq) for seq in ids)
    labels = torch.full((len(ids), T), -100)
    inputs = torch.full((len(ids), T), eos)
    for b, seq in enumerate(ids):
        labels[b, : len(seq)] = torch.tensor(seq)
        inputs[b, : len(seq)] = torch.tensor(seq)
    torch.manual_seed(0)
    prefix = torch.nn.Parameter(torch.randn(len(texts), 2, backbone.config.hidden_size) * 0.5)
    backbone.train()
    opt = torch.optim.Adam([prefix, *backbone.parameters()], lr=1e-2)
    embed = backbone.get_input_embeddings()
    for _ in range(60):
        # [R(u)] text <eos> with right padding: position m - 1 + t predicts token t.
        embeds = torch.cat([prefix, embed(inputs[:, :-1])], dim=1)  # (B, m + T - 1, d)
        logits = backbone(inputs_embeds=embeds).logits[:, 1:]  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()
    decoded_ids = greedy_decode(backbone, prefix.detach(), eos_token_id=eos, max_new_tokens=30)
    assert decoded_ids == [seq[:-1] for seq in ids]
    decoded = tokenizer.batch_decode(decoded_ids, skip_special_tokens=True)
    assert F.text_metrics(decoded, texts)["exact_match"] == 1.0


def test_greedy_decode_stops_at_max_new_tokens_without_eos(tiny_backbone):
    backbone, _ = tiny_backbone
    prefix = torch.randn(2, 1, backbone.config.hidden_size)
    out = greedy_decode(backbone, prefix, eos_token_id=-1, max_new_tokens=5)
    assert [len(t) for t in out] == [5, 5]


def test_vectorized_metrics_match_plain_loops_on_random_padded_attention():
    torch.manual_seed(0)
    L, H, B, n = 2, 3, 5, 6
    mask = torch.arange(n)[None] < torch.tensor([6, 3, 1, 4, 6])[:, None]  # (B, n)
    hist = torch.rand(L, H, B, n) / n * mask
    entropy = A.history_entropy(hist, mask)
    columns = torch.zeros(L, n)
    for layer in range(L):
        for h in range(H):
            total = 0.0
            for b in range(B):
                row = [float(hist[layer, h, b, j]) for j in range(n) if mask[b, j]]
                p = [x / sum(row) for x in row]
                total += -sum(x * math.log(x) for x in p if x > 0)
            assert entropy[layer, h].item() == pytest.approx(total / B, rel=1e-5)
        mean_heads = hist[layer].mean(dim=0)  # (B, n)
        for b in range(B):
            columns[layer] += mean_heads[b] / mean_heads[b].sum()
    c = A.column_concentration(hist.mean(dim=1), mask)
    for layer in range(L):
        col = sorted(columns[layer].tolist())
        # Gini as mean absolute difference / (2 * mean)
        mad = sum(abs(x - y) for x in col for y in col) / n**2
        assert c["gini"][layer].item() == pytest.approx(mad / (2 * np.mean(col)), rel=1e-5)
        assert c["top1_share"][layer].item() == pytest.approx(max(col) / sum(col), rel=1e-5)
    slots = A.history_slot_attention(hist, mask)
    for j in range(n):
        users = [b for b in range(B) if mask[b, j]]
        assert slots[1, 2, j].item() == pytest.approx(
            float(np.mean([hist[1, 2, b, j].item() for b in users])), rel=1e-5
        )
