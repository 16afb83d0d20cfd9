"""KarmaModel, its KarmaObjective and karma.inference on the tiny random Llama: causal
independence of u, padding parity, cache parity, gradient paths of L_rec, image slot, freezing,
persistence and inference/training agreement."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from karma.batching import BatchBuilder
from karma.checkpoint import load_checkpoint, load_model, load_weights, save_checkpoint
from karma.config import Config, ConfigError
from karma.errors import KarmaError
from karma.inference import build_user_inputs, encode_catalog, encode_users, refresh_history_cache
from karma.model import LORA_MLP_TARGETS, KarmaModel, build_model
from karma.objective import KarmaObjective
from karma.optim import param_groups


@dataclass
class Items:
    texts: list[str]

    @property
    def n_items(self) -> int:
        return len(self.texts)


@dataclass
class Examples:
    histories: list[list[int]]
    targets: np.ndarray
    queries: list[str]
    impressions: list[list[int]]


ITEMS = Items([f"Star Wars {i} ({1970 + i}) | Action, Sci-Fi, War" for i in range(24)])
EXAMPLES = Examples(
    histories=[[1, 2, 3], [4, 5], [6], [2, 7, 8, 9, 16]],
    targets=np.array([10, 11, 10, 12]),
    queries=["sci-fi movies", "", "war", ""],
    impressions=[[13, 14], [], [15], []],
)
ROWS = [0, 1, 2, 3]


def _cfg(**model) -> Config:
    cfg = Config()
    cfg.model.backbone = "tiny-random"
    cfg.model.emb_dim = 16
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def _build(cfg: Config, seed: int = 0) -> KarmaModel:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def model() -> KarmaModel:
    return _build(_cfg())


def _objective(model: KarmaModel) -> KarmaObjective:
    return KarmaObjective(model, model.cfg.loss)


def _towers(model: KarmaModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(user_emb (B, k), item_emb (U, k)) along the training path, without the losses."""
    item_hidden, item_emb = model.encode_items(
        batch["item_input_ids"], batch["item_attention_mask"], batch.get("item_image_features")
    )
    history_hidden = _objective(model)._history_hidden(batch, item_hidden)
    emb = model.user_embeds(batch["user_input_ids"], history_hidden)
    hidden = model.run_decoder(emb, batch["user_attention_mask"])
    return model.user_from_hidden(hidden, batch["emb_positions"]), item_emb


def test_losses_are_finite_and_named(model):
    batch = BatchBuilder(model.tokenizer, ITEMS, model.cfg)(EXAMPLES, ROWS)
    out = _objective(model)(batch)
    assert set(out) == {"loss", "act_loss", "gen_loss", "rec_loss", "temperature"}
    assert all(torch.isfinite(v) for v in out.values())
    expected = out["act_loss"] + 0.5 * out["gen_loss"] + 0.5 * out["rec_loss"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # A random model predicts tokens at about chance level: log(vocab).
    assert out["gen_loss"].item() == pytest.approx(np.log(len(model.tokenizer)), rel=0.2)


def test_user_emb_ignores_appended_generation_tokens(model):
    cfg = model.cfg
    with_gen = BatchBuilder(model.tokenizer, ITEMS, cfg)(EXAMPLES, ROWS)
    plain_cfg = _cfg()
    plain_cfg.loss.preset = "action_only"
    without = BatchBuilder(model.tokenizer, ITEMS, plain_cfg)(EXAMPLES, ROWS)
    assert with_gen["user_input_ids"].shape[1] > without["user_input_ids"].shape[1]
    with torch.no_grad():
        u_gen, _ = _towers(model, with_gen)
        u_plain, _ = _towers(model, without)
    assert torch.allclose(u_gen, u_plain, atol=1e-5)


def test_left_and_right_padding_give_the_same_embeddings(model):
    right = BatchBuilder(model.tokenizer, ITEMS, model.cfg)(EXAMPLES, ROWS)
    left = BatchBuilder(model.tokenizer, ITEMS, model.cfg, padding_side="left")(EXAMPLES, ROWS)
    assert (left["user_attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        u_right, e_right = _towers(model, right)
        u_left, e_left = _towers(model, left)
    assert torch.allclose(u_right, u_left, atol=1e-5)
    assert torch.allclose(e_right, e_left, atol=1e-5)


def test_rec_loss_reaches_user_embedding(model):
    batch = BatchBuilder(model.tokenizer, ITEMS, model.cfg)(EXAMPLES, ROWS)
    captured = {}

    def keep_grad(module, args, output):
        args[0].retain_grad()
        captured["u"] = args[0]

    handle = model.rec_head.register_forward_hook(keep_grad)
    try:
        model.zero_grad()
        _objective(model)(batch)["rec_loss"].backward()
    finally:
        handle.remove()
    assert captured["u"].grad is not None and captured["u"].grad.abs().sum() > 0
    assert model.user_proj.weight.grad.abs().sum() > 0
    assert model.rec_head[0].weight.grad.abs().sum() > 0
    model.zero_grad()


def test_action_only_has_no_rec_contribution():
    cfg = _cfg()
    cfg.loss.preset = "action_only"
    action = _build(cfg)
    batch = BatchBuilder(action.tokenizer, ITEMS, cfg)(EXAMPLES, ROWS)
    out = _objective(action)(batch)
    assert out["rec_loss"].item() == 0.0 and out["gen_loss"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["act_loss"].item())
    out["loss"].backward()
    assert not any(p.requires_grad for p in action.rec_head.parameters())
    assert all(p.grad is None for p in action.rec_head.parameters())
    assert action.user_proj.weight.grad.abs().sum() > 0


def test_cache_history_matches_live_when_fresh(model):
    cache_cfg = _cfg(history_source="cache")
    cached = _build(cache_cfg)
    cached.load_state_dict(model.state_dict(), strict=False)
    refresh_history_cache(cached, ITEMS.texts, batch_size=5)
    assert cached.history_cache.shape == (len(ITEMS.texts), cached.hidden_size)
    live_batch = BatchBuilder(model.tokenizer, ITEMS, model.cfg)(EXAMPLES, ROWS)
    cache_batch = BatchBuilder(cached.tokenizer, ITEMS, cache_cfg)(EXAMPLES, ROWS)
    with torch.no_grad():
        u_live, _ = _towers(model, live_batch)
        u_cache, _ = _towers(cached, cache_batch)
    assert torch.allclose(u_live, u_cache, atol=1e-5)
    empty = _build(cache_cfg)
    with pytest.raises(KarmaError, match="history cache is empty"):
        _objective(empty)(cache_batch)


def test_encode_users_matches_training_path(model):
    catalog = encode_catalog(model, ITEMS.texts, batch_size=7, progress=False)
    assert catalog.item_emb.shape == (len(ITEMS.texts), 16)
    assert torch.allclose(catalog.item_emb.norm(dim=-1), torch.ones(len(ITEMS.texts)), atol=1e-5)
    u = encode_users(model, EXAMPLES.histories, EXAMPLES.queries, catalog, batch_size=3)
    batch = BatchBuilder(model.tokenizer, ITEMS, model.cfg)(EXAMPLES, ROWS)
    with torch.no_grad():
        u_train, e_train = _towers(model, batch)
    assert torch.allclose(u, u_train, atol=1e-5)
    assert torch.allclose(catalog.item_emb[batch["item_ids"]], e_train, atol=1e-5)
    inputs = build_user_inputs(
        model, EXAMPLES.histories, EXAMPLES.queries, catalog, padding_side="left"
    )
    assert inputs["history_positions"].shape == (4, 5)
    assert (inputs["history_positions"][2, 1:] == -1).all()
    assert (inputs["first_positions"] > 0).any()
    assert model.reconstruction_prefix(u).shape == (4, model.cfg.model.rec_tokens, 64)
    with pytest.raises(KarmaError, match=r"histories\[0\]"):
        encode_users(model, [[99]], [""], catalog)


def test_text_interface_runs():
    cfg = _cfg(interface="text")
    text = _build(cfg)
    batch = BatchBuilder(text.tokenizer, ITEMS, cfg)(EXAMPLES, ROWS)
    assert torch.isfinite(_objective(text)(batch)["loss"])
    catalog = encode_catalog(text, ITEMS.texts, progress=False)
    u = encode_users(text, EXAMPLES.histories, EXAMPLES.queries, catalog, ITEMS.texts)
    with torch.no_grad():
        u_train, _ = _towers(text, batch)
    assert torch.allclose(u, u_train, atol=1e-5)


def test_image_slot_changes_item_embedding():
    cfg = _cfg(image_dim=8)
    cfg.loss.preset = "karma_mm"
    mm = _build(cfg)
    feats = np.random.default_rng(0).normal(size=(len(ITEMS.texts), 8)).astype(np.float32)
    a = encode_catalog(mm, ITEMS.texts, image_features=feats, progress=False)
    b = encode_catalog(mm, ITEMS.texts, image_features=feats[::-1].copy(), progress=False)
    assert not torch.allclose(a.item_emb, b.item_emb, atol=1e-4)
    with pytest.raises(KarmaError, match="image_features"):
        encode_catalog(mm, ITEMS.texts, progress=False)
    batch = BatchBuilder(mm.tokenizer, ITEMS, cfg, image_features=feats)(EXAMPLES, ROWS)
    out = _objective(mm)(batch)
    assert out["img_loss"].item() > 0
    out["loss"].backward()
    assert mm.image_proj[0].weight.grad.abs().sum() > 0
    assert mm.image_head[0].weight.grad.abs().sum() > 0


def test_freeze_layers_and_lora():
    frozen = _build(_cfg(freeze_layers=1))
    layers = frozen.base_lm.get_decoder().layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not frozen.base_lm.get_input_embeddings().weight.requires_grad
    assert frozen.special_embeds.requires_grad
    batch = BatchBuilder(frozen.tokenizer, ITEMS, frozen.cfg)(EXAMPLES, ROWS)
    _objective(frozen)(batch)["loss"].backward()
    assert frozen.special_embeds.grad[0].abs().sum() > 0  # <ITEM>
    assert frozen.special_embeds.grad[1].abs().sum() > 0  # <EMB>

    lora = _build(_cfg(lora=True, lora_r=4, freeze_layers=1))
    names = [n for n, p in lora.backbone.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("layers.0." in n for n in names)
    objective = _objective(lora)
    grouped = [p for g in param_groups(objective, 1e-4, 1e-3, 0.01) for p in g["params"]]
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    heads = {g["name"]: g for g in param_groups(objective, 1e-4, 1e-3, 0.01)}
    assert heads["heads"]["lr"] == 1e-3 and heads["heads_no_decay"]["weight_decay"] == 0.0


def test_lora_mlp_adds_mlp_adapters_in_trained_layers_only():
    attn = _build(_cfg(lora=True, lora_r=4, freeze_layers=1))
    both = _build(_cfg(lora=True, lora_r=4, freeze_layers=1, lora_mlp=True))

    def adapted(model):
        return {n.split(".lora_")[0] for n, p in model.backbone.named_parameters()
                if p.requires_grad and ".lora_" in n}

    mlp = {m for m in adapted(both) if m.endswith(tuple(LORA_MLP_TARGETS))}
    assert not any(m.endswith(tuple(LORA_MLP_TARGETS)) for m in adapted(attn))
    assert mlp and not any("layers.0." in m for m in mlp)
    assert adapted(attn) == adapted(both) - mlp
    batch = BatchBuilder(both.tokenizer, ITEMS, both.cfg)(EXAMPLES, ROWS)
    _objective(both)(batch)["loss"].backward()
    grads = [p.grad for n, p in both.backbone.named_parameters()
             if "down_proj.lora_B" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)
    with pytest.raises(ConfigError, match="model.lora_mlp"):
        _build(_cfg(lora_mlp=True))


def test_save_and_load_roundtrip(tmp_path):
    cfg = _cfg(history_source="cache")
    src = _build(cfg, seed=1)
    src_objective = _objective(src)
    refresh_history_cache(src, ITEMS.texts)
    with torch.no_grad():
        src.item_proj.weight.add_(0.5)
        src_objective.action_loss.log_temperature.fill_(-2.0)
    save_checkpoint(tmp_path, src, None, None, 0, cfg, objective=src_objective)
    dst, _ = load_model(tmp_path)
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name
    lm = dst.base_lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    a = encode_catalog(src, ITEMS.texts, progress=False).item_emb
    b = encode_catalog(dst, ITEMS.texts, progress=False).item_emb
    assert torch.equal(a, b)
    dst_objective = _objective(_build(cfg, seed=2))
    load_checkpoint(tmp_path, dst_objective.model, objective=dst_objective, restore_rng=False)
    assert dst_objective.action_loss.log_temperature.item() == -2.0
    with pytest.raises(KarmaError):
        load_weights(tmp_path, _build(_cfg(emb_dim=8)))


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = BatchBuilder(_build(_cfg()).tokenizer, ITEMS, _cfg())(EXAMPLES, ROWS)
    grads = []
    for checkpointing in (False, True):
        m = _build(_cfg(gradient_checkpointing=checkpointing)).train()
        _objective(m)(batch)["loss"].backward()
        grads.append(m.base_lm.get_decoder().layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_keeps_losses_close(model):
    batch = BatchBuilder(model.tokenizer, ITEMS, model.cfg)(EXAMPLES, ROWS)
    with torch.no_grad():
        full = _objective(model)(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = _objective(model)(batch)
    assert half["act_loss"].dtype == torch.float32
    assert half["act_loss"].item() == pytest.approx(full["act_loss"].item(), rel=0.05)
    assert half["gen_loss"].item() == pytest.approx(full["gen_loss"].item(), rel=0.05)


@pytest.mark.slow
def test_smollm2_backbone_predicts_targets_better_than_chance():
    cfg = Config()  # default backbone: SmolLM2-135M-Instruct (converted once into $KARMA_HOME)
    cfg.model.max_item_tokens = 16
    smol = _build(cfg)
    assert smol.tokenizer.bos_token_id is not None and smol.tokenizer.pad_token_id is not None
    batch = BatchBuilder(smol.tokenizer, ITEMS, cfg)(EXAMPLES, [0, 1])
    with torch.no_grad():
        out = _objective(smol)(batch)
    # The pretrained LM already reads item titles: far below the uniform log(49k) = 10.8.
    assert out["gen_loss"].item() < 0.6 * np.log(len(smol.tokenizer))
    assert torch.isfinite(out["loss"])
