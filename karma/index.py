"""Full-catalog retrieval: a FAISS inner-product index over item embeddings, and a torch top-k.

    index = build_index(item_emb, kind="exact", item_ids=ids)      # IndexFlatIP (default)
    index = build_index(item_emb, kind="hnsw", hnsw_m=32, ef_search=256)
    index = build_index(item_emb, kind="ivf", nlist=1024, nprobe=16)
    scores, rows = search(index, user_emb, k=200, exclude=seen)    # (U, k) each, rows = item_idx
    save_index(index, "runs/export/index"); index = load_index("runs/export/index")
    scores, rows = torch_topk_search(item_emb, user_emb, k=200, exclude=seen)  # exact, no FAISS

Item embeddings are L2-normalized by default (`normalize=True`, queries too), so inner product is
cosine similarity; pass `normalize=False` to rank by the raw inner product (e.g. SASRec logits).
Results are row indices into `item_emb` (== `item_idx` of a prepared dataset); `index.item_ids` maps
them to external ids. Rows with fewer than k results (k larger than the catalog, everything
excluded, an approximate index that ran dry) are padded with id -1 and score -inf.

Excluding seen items: FAISS cannot drop a different id set per query, so `search` retrieves
k + max(len(exclude[u]) for u in the batch) and filters, which is exact for the flat index.
GPU: when the installed FAISS has GPU support (`faiss.StandardGpuResources`) and a GPU is visible,
exact and IVF indexes are searched on GPU 0 (HNSW stays on CPU; FAISS has no GPU HNSW).
`torch_topk_search` is the exact reference used on GPU machines that only have faiss-cpu and by
`benchmarks/eval_scale.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.errors import KarmaError

KINDS = ("exact", "hnsw", "ivf")
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger k falls back to the CPU copy


@dataclass
class ItemIndex:
    """A built index: the CPU FAISS index, an optional GPU copy, and the row -> item id map."""

    cpu_index: Any
    item_ids: np.ndarray  # (N,) external ids by row
    kind: str
    normalize: bool
    params: dict[str, Any] = field(default_factory=dict)
    gpu_index: Any = None
    gpu_resources: Any = None  # kept alive as long as the GPU index

    @property
    def n_items(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)


def _as_float32(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise KarmaError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise KarmaError(f"{name} contains NaN or inf values")
    return x


def _to_gpu(cpu_index: Any) -> tuple[Any, Any]:
    """(gpu_index, resources) when FAISS has GPU support and sees a GPU, else (None, None)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None, None
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, cpu_index), resources


def build_index(
    item_emb: np.ndarray | torch.Tensor,
    kind: str = "exact",
    *,
    item_ids: Sequence[Any] | np.ndarray | None = None,
    normalize: bool = True,
    hnsw_m: int = 32,
    ef_search: int = 256,
    ef_construction: int = 80,
    nlist: int = 1024,
    nprobe: int = 16,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> ItemIndex:
    """Build an inner-product index over `item_emb` (N, d).

    kind: "exact" (IndexFlatIP), "hnsw" (IndexHNSWFlat: `hnsw_m` links, `ef_construction`,
    `ef_search`) or "ivf" (IndexIVFFlat trained on the items: `nlist` lists, `nprobe` probed).
    `nlist` is capped at N // 39 (FAISS wants >= 39 training points per centroid).
    use_gpu: None = when available, False = never, True = required.
    """
    import faiss

    if kind not in KINDS:
        raise KarmaError(f"eval.index: unknown index kind '{kind}' (known: {', '.join(KINDS)})")
    emb = _as_float32(item_emb, "item_emb").copy()
    n, dim = emb.shape
    if n == 0:
        raise KarmaError("item_emb is empty: cannot index an empty catalog")
    if normalize:
        faiss.normalize_L2(emb)
    ids = np.arange(n) if item_ids is None else np.asarray(item_ids)
    if len(ids) != n:
        raise KarmaError(f"item_ids has {len(ids)} entries but item_emb has {n} rows")

    params: dict[str, Any] = {}
    if kind == "exact":
        cpu_index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        cpu_index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        cpu_index.hnsw.efConstruction = ef_construction
        cpu_index.hnsw.efSearch = ef_search
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    else:
        nlist = max(1, min(nlist, n // 39))
        nprobe = min(nprobe, nlist)
        quantizer = faiss.IndexFlatIP(dim)
        cpu_index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        cpu_index.cp.seed = seed
        cpu_index.train(emb)
        cpu_index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe}
    cpu_index.add(emb)

    index = ItemIndex(cpu_index, ids, kind, normalize, params)
    if use_gpu is not False and kind != "hnsw":
        index.gpu_index, index.gpu_resources = _to_gpu(cpu_index)
    if use_gpu and index.gpu_index is None:
        raise KarmaError(f"use_gpu=True but FAISS has no GPU support or sees no GPU (kind={kind})")
    return index


def save_index(index: ItemIndex, path: str | Path) -> Path:
    """Write `index.faiss`, `item_ids.json` and `index.json` (kind, params) into `path`."""
    import faiss

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index.cpu_index, str(path / "index.faiss"))
    ids = [x.item() if hasattr(x, "item") else x for x in index.item_ids]
    (path / "item_ids.json").write_text(json.dumps(ids))
    meta = {
        "kind": index.kind,
        "normalize": index.normalize,
        "params": index.params,
        "n_items": index.n_items,
        "dim": index.dim,
    }
    (path / "index.json").write_text(json.dumps(meta, indent=2))
    return path


def load_index(path: str | Path, use_gpu: bool | None = None) -> ItemIndex:
    """Read an index written by `save_index` (moved to GPU as in `build_index`)."""
    import faiss

    path = Path(path)
    for name in ("index.faiss", "item_ids.json", "index.json"):
        if not (path / name).is_file():
            raise KarmaError(f"{path}: not a saved index (missing {name})")
    meta = json.loads((path / "index.json").read_text())
    cpu_index = faiss.read_index(str(path / "index.faiss"))
    ids = np.asarray(json.loads((path / "item_ids.json").read_text()))
    if len(ids) != cpu_index.ntotal:
        raise KarmaError(f"{path}/item_ids.json: {len(ids)} ids for {cpu_index.ntotal} vectors")
    index = ItemIndex(cpu_index, ids, meta["kind"], meta["normalize"], meta.get("params", {}))
    if use_gpu is not False and index.kind != "hnsw":
        index.gpu_index, index.gpu_resources = _to_gpu(cpu_index)
    if use_gpu and index.gpu_index is None:
        raise KarmaError("use_gpu=True but FAISS has no GPU support or sees no GPU")
    return index


def filter_excluded(
    scores: np.ndarray, ids: np.ndarray, exclude: Sequence[Sequence[int]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's excluded ids from a ranked (U, L) result, keep the first k of the rest."""
    n_rows, length = ids.shape
    lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=n_rows)
    if lengths.sum() > 0:
        # one flat membership test: key = row * stride + id, unique per (row, id)
        stride = int(max(ids.max(initial=0), max((max(e) for e in exclude if len(e)), default=0)))
        stride += 1
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
        ex_keys = rows * stride + np.concatenate([np.asarray(e, np.int64) for e in exclude])
        drop = np.isin(np.arange(n_rows, dtype=np.int64)[:, None] * stride + ids, ex_keys)
        drop &= ids >= 0
    else:
        drop = np.zeros_like(ids, dtype=bool)
    # stable sort on the drop flag moves kept entries to the front in their original order
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # (U, min(k, L))
    ids = np.take_along_axis(ids, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    dropped = np.take_along_axis(drop, order, axis=1)
    ids = np.where(dropped, -1, ids)
    scores = np.where(dropped, -np.inf, scores).astype(np.float32)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, ids


def search(
    index: ItemIndex,
    queries: np.ndarray | torch.Tensor,
    k: int,
    batch_size: int = 4096,
    exclude: Sequence[Sequence[int]] | None = None,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) for each query (U, d), in batches, skipping `exclude[u]` ids.

    Returns float32 scores (U, k) and int64 item rows (U, k), best first, padded with -inf / -1.
    """
    import faiss

    queries = _as_float32(queries, "queries")
    if queries.shape[1] != index.dim:
        raise KarmaError(f"queries have dim {queries.shape[1]} but the index has dim {index.dim}")
    if exclude is not None and len(exclude) != len(queries):
        raise KarmaError(f"exclude has {len(exclude)} lists for {len(queries)} queries")
    if k < 1:
        raise KarmaError(f"top-k must be >= 1, got {k}")
    if index.normalize:
        queries = queries.copy()
        faiss.normalize_L2(queries)
    all_scores = np.empty((len(queries), k), dtype=np.float32)
    all_ids = np.empty((len(queries), k), dtype=np.int64)
    starts = range(0, len(queries), batch_size)
    for start in tqdm(starts, desc=f"search {index.kind}", unit="batch", disable=not show_progress):
        stop = min(start + batch_size, len(queries))
        batch_exclude = exclude[start:stop] if exclude is not None else None
        extra = max((len(e) for e in batch_exclude), default=0) if batch_exclude else 0
        k_fetch = min(k + extra, index.n_items)
        on_gpu = index.gpu_index is not None and k_fetch <= GPU_MAX_K
        faiss_index = index.gpu_index if on_gpu else index.cpu_index
        if index.kind == "hnsw":
            # efSearch bounds the candidate list; FAISS uses max(efSearch, k) but be explicit
            faiss_index.hnsw.efSearch = max(index.params["ef_search"], k_fetch)
        scores, ids = faiss_index.search(queries[start:stop], k_fetch)  # (B, k_fetch)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if batch_exclude is not None:
            scores, ids = filter_excluded(scores, ids, batch_exclude, k)
        elif k_fetch < k:
            scores = np.pad(scores, ((0, 0), (0, k - k_fetch)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - k_fetch)), constant_values=-1)
        all_scores[start:stop], all_ids[start:stop] = scores[:, :k], ids[:, :k]
    return all_scores, all_ids


def torch_topk_search(
    item_emb: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    batch_size: int | None = None,
    exclude: Sequence[Sequence[int]] | None = None,
    device: str | torch.device | None = None,
    max_block_elements: int = 1 << 26,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by chunked `queries @ item_emb.T` and `torch.topk`, raw inner products.

    The (B, N) score block holds at most `max_block_elements` floats (256 MB by default), which
    sets B when `batch_size` is None. device: None = CUDA when available, else CPU.
    Returns float32 scores (U, k) and int64 rows (U, k) on the CPU, padded with -inf / -1.
    """
    from karma.distributed import resolve_device
    from karma.metrics import top_k_masked

    device = torch.device(device) if device is not None else resolve_device("auto")
    items = torch.as_tensor(_as_float32(item_emb, "item_emb")).to(device)  # (N, d)
    queries_np = _as_float32(queries, "queries")
    if queries_np.shape[1] != items.shape[1]:
        raise KarmaError(f"queries have dim {queries_np.shape[1]}, items have {items.shape[1]}")
    if exclude is not None and len(exclude) != len(queries_np):
        raise KarmaError(f"exclude has {len(exclude)} lists for {len(queries_np)} queries")
    n_items = items.shape[0]
    batch_size = batch_size or max(1, max_block_elements // n_items)
    all_scores = np.full((len(queries_np), k), -np.inf, dtype=np.float32)
    all_ids = np.full((len(queries_np), k), -1, dtype=np.int64)
    starts = range(0, len(queries_np), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="search torch", unit="batch", disable=not show_progress):
            stop = min(start + batch_size, len(queries_np))
            q = torch.from_numpy(queries_np[start:stop]).to(device)  # (B, d)
            seen = exclude[start:stop] if exclude is not None else None
            top_scores, top_ids = top_k_masked(q @ items.T, k, seen)  # (B, k)
            all_scores[start:stop] = top_scores.cpu().numpy()
            all_ids[start:stop] = top_ids.cpu().numpy()
    return all_scores, all_ids
