"""The decoder of a Hugging Face backbone run by ONNX Runtime, with fp32 or int8 weights.

    runner = OnnxDecoder(decoder, "onnx-int8", num_threads=2)
    hidden, kv = runner(inputs_embeds, position_ids, attention_mask, past)  # past: [(k, v)] | None

Why: at batch 1 the fast user path (karma/fast_user.py) spends its time in the decoder's
matmuls, and torch's CPU kernels for a few rows are slow and have no fast int8-weight path
(docs/decisions.md, Serving). ONNX Runtime's MLAS has both.

Export: `torch.onnx.export` (the dynamo exporter) of a thin wrapper around the HF decoder module
(`get_decoder()`: embeddings, layers, final norm; no lm_head), never a copy of the modeling code:

    inputs_embeds (B, N, d), position_ids (B, N), attention_mask (B, P + N),
    past.{l}.key / past.{l}.value (B, h_kv, P, hd) per layer, and, when `residual_at` names a
    submodule, residual (B, N, d) added to that submodule's input (`KarmaModel.history_residual`)
    -> hidden (B, N, d) after the final norm, present.{l}.key / .value (B, h_kv, P + N, hd)

B, N and P are dynamic (P = 0 is an empty past). The unused token embedding table is dropped.

int8: onnxruntime's MatMulNBits quantizer, 8 bits in blocks of `INT8_BLOCK` input channels
along K, symmetric, with `accuracy_level` 4: MLAS's 8-bit kernel quantizes the activations of
each block on the fly and runs int8 dot products (AVX2/AVX512-VNNI). Level 0 (fp32 compute)
keeps the activations but has no 8-bit kernel on CPU: it dequantizes every weight on every call,
5-10x slower than the fp32 graph. The matmuls of the layers `FP32_LAYERS` (the first and the
last) stay fp32. Measurements behind these choices: docs/decisions.md (Serving).

Cache: karma_home()/onnx/<fingerprint>/<variant>/decoder.onnx (+ decoder.onnx.data), the
fingerprint hashing the weights, the HF config, the residual site and the versions of torch,
transformers and onnxruntime, so a changed checkpoint or toolchain exports anew. An export
runs once (about 2 minutes for SmolLM2-135M on 2 cores) and lands by one directory rename.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.errors import KarmaError

RUNTIMES = ("torch", "onnx", "onnx-int8")
INT8_BLOCK = 32
INT8_ACCURACY_LEVEL = 4
# Decoder layers whose matmuls stay fp32 in onnx-int8 (negative: from the end). On SmolLM2-135M
# the first and the last layer carry most of int8's error and hold 2/30 of the weights.
FP32_LAYERS: tuple[int, ...] = (0, -1)
_FORMAT = 1  # bump when the exported graph's interface changes
_NEEDED = "onnxruntime, onnx and onnxscript (pip install 'karma[serve-fast]')"


def require_onnxruntime(runtime: str) -> Any:
    """The onnxruntime module, or a KarmaError naming the extra to install."""
    try:
        import onnx  # noqa: F401  (the exporter and the quantizer need them)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise KarmaError(f"serve.runtime={runtime} needs {_NEEDED}: {exc}") from exc
    return onnxruntime


def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a HF decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", heads), head_dim


def _names(n_layers: int, kind: str) -> list[str]:
    return [f"{kind}.{layer}.{part}" for layer in range(n_layers) for part in ("key", "value")]


class _Exportable(torch.nn.Module):
    """The HF decoder with flat tensor inputs and outputs (the exporter's interface)."""

    def __init__(self, decoder: torch.nn.Module, residual_at: str | None) -> None:
        super().__init__()
        self.decoder = decoder
        self.residual_at = residual_at

    def forward(self, inputs_embeds, position_ids, attention_mask, past, residual=None):
        from transformers import DynamicCache

        from karma.model import cache_keyword

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        handle = None
        if residual is not None:

            def add(_module: torch.nn.Module, args: tuple) -> tuple:
                return (args[0] + residual, *args[1:])

            target = self.decoder.get_submodule(self.residual_at)
            handle = target.register_forward_pre_hook(add)
        try:
            out = self.decoder(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=True,
                **{cache_keyword(self.decoder): cache},
            )
        finally:
            if handle is not None:
                handle.remove()
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return out.last_hidden_state, *present


def export_decoder(decoder: torch.nn.Module, path: Path, residual_at: str | None) -> None:
    """Export `decoder` (fp32, CPU) to `path` (+ `path`.data) with dynamic B, N and P."""
    n_layers, kv_heads, head_dim = _kv_shape(decoder.config)
    d = decoder.config.hidden_size
    # Example sizes > 1 and all different, so the exporter keeps them symbolic.
    B, N, P = 2, 3, 4
    past = [torch.zeros(B, kv_heads, P, head_dim) for _ in range(2 * n_layers)]
    args: tuple = (
        torch.zeros(B, N, d),
        torch.arange(P, P + N).repeat(B, 1),
        torch.ones(B, P + N, dtype=torch.long),
        past,
    )
    batch, new, past_len = torch.export.Dim("batch"), torch.export.Dim("new"), torch.export.Dim(
        "past"
    )
    total = torch.export.Dim("total")
    shapes: dict[str, Any] = {
        "inputs_embeds": {0: batch, 1: new},
        "position_ids": {0: batch, 1: new},
        "attention_mask": {0: batch, 1: total},
        "past": [{0: batch, 2: past_len}] * (2 * n_layers),
    }
    inputs = ["inputs_embeds", "position_ids", "attention_mask", *_names(n_layers, "past")]
    if residual_at is not None:
        args = (*args, torch.zeros(B, N, d))
        shapes["residual"] = {0: batch, 1: new}
        inputs.append("residual")
    with _quiet("torch.onnx"), torch.no_grad(), warnings.catch_warnings():
        # notes on how it named the dynamic axes and on torch.utils._pytree internals
        warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            _Exportable(decoder, residual_at).eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=["hidden", *_names(n_layers, "present")],
            dynamic_shapes=shapes,
            dynamo=True,
            external_data=True,
            verbose=False,
        )


def quantize_int8(
    src: Path, dst: Path, fp32_layers: set[int], block_size: int = INT8_BLOCK
) -> None:
    """Replace the MatMuls with a constant weight by MatMulNBits, 8-bit blocks along K, except
    in the decoder layers `fp32_layers`."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    keep = _layer_matmuls(model, fp32_layers)
    with _quiet("onnxruntime.quantization"):
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=INT8_ACCURACY_LEVEL,
            nodes_to_exclude=keep,
        )
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


def _layer_matmuls(model: Any, layers: set[int]) -> list[str]:
    """Names of the MatMul nodes inside decoder layers `layers`, found by the module path the
    exporter records on each node (metadata `pkg.torch.onnx.name_scopes`)."""
    wanted = {f"decoder.layers.{layer}" for layer in layers}
    names, found = [], set()
    for node in model.graph.node:
        scopes = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]"
        )
        hit = wanted.intersection(ast.literal_eval(scopes))
        if node.op_type == "MatMul" and hit:
            names.append(node.name)
            found |= hit
    if found != wanted:
        raise KarmaError(
            f"ONNX export: no MatMul recorded for {sorted(wanted - found)} (the exporter's "
            "metadata changed?); cannot keep them in fp32"
        )
    return names


@contextmanager
def _quiet(logger_name: str):
    """The exporter and the quantizer log every step at INFO; keep warnings only."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def fingerprint(decoder: torch.nn.Module, residual_at: str | None) -> str:
    """What the exported graph depends on: weights, config, residual site, toolchain."""
    import onnxruntime
    import transformers

    digest = hashlib.blake2b(digest_size=12)
    meta = {
        "format": _FORMAT,
        "config": decoder.config.to_dict(),
        "residual_at": residual_at,
        "versions": [torch.__version__, transformers.__version__, onnxruntime.__version__],
    }
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in decoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


def cached_model(
    decoder: torch.nn.Module, runtime: str, residual_at: str | None, cache_root: Path | None = None
) -> Path:
    """The .onnx file of `runtime` ("onnx" or "onnx-int8") for this decoder, built if missing."""
    from karma.backbones import karma_home

    root = (cache_root or karma_home() / "onnx") / fingerprint(decoder, residual_at)
    fp32 = _build(root / "fp32", lambda p: export_decoder(decoder, p, residual_at))
    if runtime == "onnx":
        return fp32
    n_layers = _kv_shape(decoder.config)[0]
    layers = {layer % n_layers for layer in FP32_LAYERS}
    # the settings name the directory, so changing one quantizes anew
    kept = "".join(f"_{layer}" for layer in sorted(layers))
    name = f"int8-b{INT8_BLOCK}-a{INT8_ACCURACY_LEVEL}-fp32{kept}"
    return _build(root / name, lambda p: quantize_int8(fp32, p, layers))


def _build(directory: Path, make: Any) -> Path:
    """directory/decoder.onnx, made by `make(path)` in a temp directory renamed into place (a
    concurrent builder's result wins; a crash leaves only a stray temp directory)."""
    path = directory / "decoder.onnx"
    if path.is_file():
        return path
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        make(tmp / "decoder.onnx")
        try:
            os.rename(tmp, directory)
        except OSError:
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class OnnxDecoder:
    """Runs a HF decoder through an onnxruntime InferenceSession; tensors in, tensors out."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        runtime: str,
        residual_at: str | None = None,
        num_threads: int = 0,
        cache_root: Path | None = None,
    ) -> None:
        if runtime not in RUNTIMES[1:]:
            raise ValueError(f"runtime must be one of {RUNTIMES[1:]}, got {runtime!r}")
        ort = require_onnxruntime(runtime)
        dtypes = {p.dtype for p in decoder.parameters()}
        if dtypes != {torch.float32}:
            raise KarmaError(f"serve.runtime={runtime} exports float32 weights, not {dtypes}")
        self.runtime = runtime
        self.residual_at = residual_at
        self.n_layers, self.kv_heads, self.head_dim = _kv_shape(decoder.config)
        self.path = cached_model(decoder, runtime, residual_at, cache_root)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads  # 0: one thread per physical core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """hidden (B, N, d) and per-layer (keys, values) (B, h_kv, P + N, hd), on the device
        of inputs_embeds; past: per-layer (keys, values) (B, h_kv, P, hd), None for P = 0."""
        device = inputs_embeds.device
        B = inputs_embeds.shape[0]
        feeds = {
            "inputs_embeds": _array(inputs_embeds, np.float32),
            "position_ids": _array(position_ids, np.int64),
            "attention_mask": _array(attention_mask, np.int64),
        }
        if past is None:
            empty = torch.zeros(B, self.kv_heads, 0, self.head_dim)
            past = [(empty, empty)] * self.n_layers
        for layer, (keys, values) in enumerate(past):
            feeds[f"past.{layer}.key"] = _array(keys, np.float32)
            feeds[f"past.{layer}.value"] = _array(values, np.float32)
        if self.residual_at is not None:
            if residual is None:
                residual = torch.zeros_like(inputs_embeds)
            feeds["residual"] = _array(residual, np.float32)
        hidden, *present = self.session.run(None, feeds)
        kv = [
            (torch.from_numpy(k).to(device), torch.from_numpy(v).to(device))
            for k, v in zip(present[0::2], present[1::2])
        ]
        return torch.from_numpy(hidden).to(device), kv


def _array(t: torch.Tensor, dtype: Any) -> np.ndarray:
    """A contiguous CPU array (no copy when t already is one, as the stacked past is)."""
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
