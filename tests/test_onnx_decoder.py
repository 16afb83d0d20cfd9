"""The ONNX Runtime decoder (karma/onnx_decoder.py) inside the fast user path."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_fast_user import CASES, build, randomize

from karma.errors import KarmaError
from karma.fast_user import FastUserEncoder, plain_user_embeddings

needs_onnxruntime = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "onnxscript")),
    reason="the serve-fast extra is not installed",
)


@pytest.fixture(scope="module", autouse=True)
def karma_home(tmp_path_factory: pytest.TempPathFactory):
    """One KARMA_HOME for the module, so each model is exported once, not once per test."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("karma_home")
        mp.setenv("KARMA_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def tiny():
    return build("continuous", "history_first")


@pytest.fixture
def quantize_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 in every layer: by default the first and the last stay fp32, which in the 2-layer
    tiny model is all of them."""
    import karma.onnx_decoder

    monkeypatch.setattr(karma.onnx_decoder, "FP32_LAYERS", ())


def op_counts(path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


# The tiny model's weights are small and evenly spread, so int8 keeps u almost exactly (cosine
# 0.99999 or better); the real backbone's outliers are what the benchmark measures
# (benchmarks/serve_latency.py --runtime onnx,onnx-int8).
@needs_onnxruntime
@pytest.mark.parametrize(("runtime", "min_cos"), [("onnx", 0.9999), ("onnx-int8", 0.999)])
def test_onnx_runtime_matches_the_torch_fast_path(
    tiny, quantize_all, runtime: str, min_cos: float
) -> None:
    model, catalog, texts = tiny
    reference = FastUserEncoder(model, catalog, texts)
    enc = FastUserEncoder(model, catalog, texts, runtime=runtime, num_threads=1)
    # 7 projections in each of the 2 layers
    assert op_counts(enc.onnx.path)["MatMulNBits"] == (14 if runtime == "onnx-int8" else 0)
    for history, query in CASES:
        u_ref = reference.encode([history], [query], ["u1"])
        u = enc.encode([history], [query], ["u1"])
        assert F.cosine_similarity(u, u_ref).min().item() >= min_cos
    assert enc.stats == reference.stats  # the same prefixes were reused


@needs_onnxruntime
def test_onnx_batched_mixed_prefixes_match_plain(tiny) -> None:
    model, catalog, texts = tiny
    enc = FastUserEncoder(model, catalog, texts, runtime="onnx", num_threads=1)
    enc.encode([[1, 2, 3]], ["comedy"], ["a"])
    histories = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10], [1, 2, 3, 4]]
    queries = ["drama", "", "action film", "comedy", "comedy"]
    for _ in range(2):  # the second round hits every cache, in one batch
        fast = enc.encode(histories, queries, ["a", "b", None, None, "a"])
        plain = plain_user_embeddings(model, histories, queries, catalog, texts)
        assert F.cosine_similarity(fast, plain).min().item() >= 0.9999


@needs_onnxruntime
@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_cached_user_gets_the_fresh_answer(tiny, quantize_all, runtime: str) -> None:
    """A returning user's u, computed from cached key/values fed back to ONNX Runtime, is the
    u of the same request from an encoder that has nothing cached."""
    model, catalog, texts = tiny
    enc = FastUserEncoder(model, catalog, texts, runtime=runtime, num_threads=1)
    run = []
    for history, query in CASES:
        before = enc.stats["tokens_run"]
        u = enc.encode([history], [query], ["u1"])
        run.append(enc.stats["tokens_run"] - before)
        saved = (enc.users, enc.shared)
        enc.clear()
        fresh = enc.encode([history], [query], ["u1"])
        enc.users, enc.shared = saved
        assert torch.allclose(u, fresh, atol=1e-5)
    assert run[4] == 1  # the exact repeat runs <EMB> alone
    assert run[1] < run[0] and run[2] < run[0]  # a new query or click reuses a prefix


@needs_onnxruntime
def test_item_ids_and_lora_reach_the_exported_decoder() -> None:
    """The ID embeddings enter the exported graph as its `residual` input, at layer
    model.freeze_layers; the LoRA adapters are merged before the export."""

    def trained(model) -> None:
        model.init_item_ids(30, torch.arange(30) < 25)
        randomize([model.history_id_emb, model.item_id_emb])
        randomize(p for n, p in model.named_parameters() if "lora_B" in n)

    model, catalog, texts = build(
        "continuous", "history_first", "model.item_ids=true", "model.lora=true",
        "model.freeze_layers=1", prepare=trained,
    )
    enc = FastUserEncoder(model, catalog, texts, runtime="onnx", num_threads=1)
    assert enc.onnx.residual_at == "layers.1"
    for history, query in [*CASES, ([26, 3], "horror")]:  # 26: an item without an ID
        fast = enc.encode([history], [query], ["u1"])
        plain = plain_user_embeddings(model, [history], [query], catalog, texts)
        assert F.cosine_similarity(fast, plain).min().item() >= 0.9999


@needs_onnxruntime
def test_int8_keeps_the_chosen_layers_in_fp32(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    import karma.onnx_decoder as onnx_decoder

    model, catalog, texts = tiny
    monkeypatch.setattr(onnx_decoder, "FP32_LAYERS", (-1,))  # the last layer of 2
    enc = FastUserEncoder(model, catalog, texts, runtime="onnx-int8", num_threads=1)
    assert enc.onnx.path.parent.name.endswith("-fp32_1")
    graph = onnx.load(str(enc.onnx.path), load_external_data=False)
    kept = set(onnx_decoder._layer_matmuls(graph, {1}))  # its projections and attention
    assert len(kept) >= 7 and {n.op_type for n in graph.graph.node if n.name in kept} == {"MatMul"}
    assert op_counts(enc.onnx.path)["MatMulNBits"] == 7  # layer 0's projections
    with pytest.raises(KarmaError, match="decoder.layers.5"):
        onnx_decoder._layer_matmuls(graph, {5})


@needs_onnxruntime
def test_export_is_cached(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    import karma.onnx_decoder as onnx_decoder

    model, catalog, texts = tiny
    first = FastUserEncoder(model, catalog, texts, runtime="onnx", num_threads=1)

    def no_export(*_args, **_kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_decoder, "export_decoder", no_export)
    assert FastUserEncoder(model, catalog, texts, runtime="onnx").onnx.path == first.onnx.path


def test_missing_onnxruntime_is_a_clear_error(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, catalog, texts = tiny
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(KarmaError, match=r"serve.runtime=onnx-int8 needs onnxruntime.*serve-fast"):
        FastUserEncoder(model, catalog, texts, runtime="onnx-int8")


def test_serve_runtime_is_checked() -> None:
    from karma.config import ConfigError, load_config

    assert load_config(None, ["serve.runtime=onnx-int8"]).serve.runtime == "onnx-int8"
    with pytest.raises(ConfigError, match="serve.runtime"):
        load_config(None, ["serve.runtime=tensorrt"])
