"""`karma analyze`: attention sinks and semantic fidelity of a checkpoint, or of two side by side.

    karma analyze --checkpoint runs/karma/checkpoints/best --compare runs/ao/checkpoints/best \
        --out runs/analysis analysis.probe_users=200

    from karma.analysis import analyze
    out_dir = analyze("runs/karma", compare="runs/ao", out_dir="runs/analysis")

A checkpoint is a checkpoint directory, a run directory (its checkpoints/best, else last), or a
backbone name (an untouched backbone with freshly initialized heads). Probe users: a seeded
sample of `analysis.probe_users` examples of `analysis.split` of the checkpoint's prepared data.
When R was not trained with L_rec (presets action_only and gen, or a fresh backbone), it is fitted
post hoc with everything else frozen, for the same number of steps and batch size as training
(`analysis.fit_steps` / `analysis.fit_batch_size` override), on training examples' targets.
Overrides (`a.b=c`) apply to the loaded config; they change data and analysis settings, not the
architecture of a trained model. Writes `analysis.md`, `analysis.json` and PNGs into out_dir.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.analysis import attention as A
from karma.analysis import plots
from karma.analysis.collect import collect_emb_attention, eager_attention, summarize_attention
from karma.analysis.fidelity import (
    catalog_ranks,
    fit_reconstruction_head,
    rank_metrics,
    reconstruction_nll,
    text_metrics,
)
from karma.atomic import ensure_output_dir
from karma.config import Config, load_config
from karma.errors import KarmaError

LAYER_COLUMNS = (
    ("sink_rate_first", "sink rate first (all q)"),
    ("sink_rate_first_emb", "sink rate first (`<EMB>`)"),
    ("sink_rate_history", "sink rate top hist"),
    ("emb_to_first_mass", "`<EMB>`->first mass"),
    ("history_mass", "`<EMB>`->hist mass"),
    ("entropy", "hist entropy"),
    ("entropy_norm", "hist entropy / log n"),
    ("top1_share", "col top-1 share"),
    ("gini", "col Gini"),
    ("freq_spearman", "freq Spearman"),
)
CURVES = ("sink_rate_first_emb", "emb_to_first_mass", "entropy_norm", "top1_share")
FIDELITY_KEYS = (
    "token_f1",
    "rouge_l",
    "exact_match",
    "genre_any",
    "genre_all",
    "text_query_rank_median",
    "text_query_mrr",
    "text_query_hr@10",
    "user_query_rank_median",
    "user_query_mrr",
    "user_query_hr@10",
    "rec_nll",
    "rec_nll_other",
    "rec_nll_own_wins",
)


def load_for_analysis(
    checkpoint: str | Path, overrides: list[str] | None = None
) -> tuple[torch.nn.Module, Config, bool]:
    """(model in eval mode, config, fresh) for a checkpoint dir, a run dir or a backbone name;
    `fresh` is True for a backbone name (heads untrained)."""
    from karma.checkpoint import load_model
    from karma.distributed import resolve_device
    from karma.model import build_model

    path = Path(checkpoint)
    if path.is_dir():
        # A run directory holds config.yaml too, so a checkpoint is recognized by its weights.
        for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last"):
            if (candidate / "model.safetensors").exists():
                model, cfg = load_model(candidate, overrides)
                return model, cfg, False
        raise KarmaError(
            f"{path}: neither a checkpoint (no model.safetensors) nor a run "
            "directory (no checkpoints/best or checkpoints/last)"
        )
    if "/" in str(checkpoint) or str(checkpoint).startswith("."):
        raise KarmaError(f"{checkpoint}: no such checkpoint directory")
    cfg = load_config(None, [f"model.backbone={checkpoint}", *(overrides or [])])
    model = build_model(cfg).to(resolve_device(cfg.train.device)).eval()
    return model, cfg, True


def _heatmap_layers(cfg: Config, n_layers: int) -> list[int]:
    """analysis.heatmap_layers (negative counts from the end), default first, middle, last."""
    layers = cfg.analysis.heatmap_layers or [0, n_layers // 2, n_layers - 1]
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise KarmaError(
                f"config key 'analysis.heatmap_layers': layer {layer} outside "
                f"[{-n_layers}, {n_layers})"
            )
    return sorted({layer % n_layers for layer in layers})


def _fit_r(model: torch.nn.Module, cfg: Config, prepared: Any, catalog: Any) -> str:
    """Fit R post hoc on training examples; returns a description for the report."""
    from karma.inference import encode_users
    from karma.optim import lr_factor

    tc = cfg.train
    steps = cfg.analysis.fit_steps if cfg.analysis.fit_steps >= 0 else tc.steps
    batch_size = cfg.analysis.fit_batch_size or tc.batch_size
    if steps == 0:
        return "untrained (analysis.fit_steps=0: nothing fitted)"
    train = prepared.split("train")
    rng = np.random.default_rng(tc.seed)
    rows = rng.choice(len(train), size=min(len(train), steps * batch_size), replace=False)
    histories = [train.histories[r] for r in rows]
    queries = [train.queries[r] for r in rows]
    texts = [prepared.items.texts[int(train.targets[r])] for r in rows]
    user_emb = encode_users(
        model,
        histories,
        queries,
        catalog,
        prepared.items.texts,
        batch_size=cfg.analysis.batch_size * 4,
        progress=True,
    )
    losses = fit_reconstruction_head(
        model,
        user_emb,
        texts,
        steps=steps,
        batch_size=batch_size,
        lr=tc.head_lr,
        weight_decay=tc.weight_decay,
        seed=tc.seed,
        schedule=lambda step: lr_factor(step, tc.warmup_steps, steps, tc.min_lr_ratio),
    )
    tail = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    return (
        f"fitted post hoc, backbone and u frozen: {steps} steps x {batch_size} training "
        f"targets, lr {tc.head_lr:g}; L_rec {losses[0]:.3f} -> {tail:.3f}"
    )


def analyze_checkpoint(
    checkpoint: str | Path, overrides: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """All numbers for one checkpoint (see `analyze`); the model is freed afterwards."""
    from karma.data import load_or_prepare
    from karma.evaluate import other_histories
    from karma.inference import decode_from_embedding, encode_catalog, encode_users
    from karma.losses import loss_weights

    model, cfg, fresh = load_for_analysis(checkpoint, overrides)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    ac = cfg.analysis
    layers = _heatmap_layers(cfg, model.base_lm.config.num_hidden_layers)  # fail before work
    prepared = load_or_prepare(cfg)
    items = prepared.items
    split = prepared.split(ac.split)
    rng = np.random.default_rng(ac.seed)
    rows = np.sort(rng.choice(len(split), size=min(ac.probe_users, len(split)), replace=False))
    rows = [int(r) for r in rows if len(split.histories[r]) > 0]
    if not rows:
        raise KarmaError(f"{prepared.dir}: split '{ac.split}' has no example with a history")
    histories = [split.histories[r] for r in rows]
    queries = [split.queries[r] for r in rows]
    targets = torch.tensor([int(split.targets[r]) for r in rows])

    image_features = prepared.model_image_features(cfg.model.image_dim)
    model.set_image_table(image_features)
    catalog = encode_catalog(model, items.texts, image_features=image_features, progress=progress)
    with eager_attention(model.base_lm):
        probe = collect_emb_attention(
            model,
            histories,
            queries,
            catalog,
            items.texts,
            batch_size=ac.batch_size,
            progress=progress,
        )
    frequency = np.bincount(prepared.split("train").targets, minlength=items.n_items)
    summary = summarize_attention(probe, item_frequency=frequency, eps=ac.eps)
    heat = A.renormalize_history(probe.history.mean(dim=1), probe.history_mask)  # (L, B, n)

    lambda_rec = loss_weights(cfg.loss)[1]
    if fresh or lambda_rec == 0:
        r_source = _fit_r(model, cfg, prepared, catalog)
    else:
        r_source = f"trained jointly with L_rec (lambda_rec={lambda_rec:g})"
    user_emb = encode_users(model, histories, queries, catalog, items.texts)
    decoded = decode_from_embedding(model, user_emb, max_new_tokens=ac.max_new_tokens)
    target_texts = [items.texts[int(t)] for t in targets]
    fidelity = text_metrics(decoded, target_texts, [items.categories[int(t)] for t in targets])
    # Decoded text has no picture: it is read as an item without an image (a zero feature, as
    # data prepare stores for those), so the text-as-query rank measures what the text carries.
    no_image = None if image_features is None else np.zeros(
        (len(decoded), image_features.shape[1]), dtype=np.float32
    )
    # and it is no catalog item: no item ID (-1) either
    decoded_emb = encode_catalog(model, decoded, image_features=no_image, progress=False,
                                 item_ids=[-1] * len(decoded)).item_emb  # fmt: skip
    fidelity.update(rank_metrics(catalog_ranks(decoded_emb, catalog.item_emb, targets)))
    fidelity.update(
        rank_metrics(catalog_ranks(user_emb, catalog.item_emb, targets), prefix="user_query_")
    )
    # The whole target text scored under R(u), and under the R(u') of another probe user (the
    # seeded permutation of `karma eval`'s other history): what u tells the decoder about its
    # own target beyond what any u does
    own = reconstruction_nll(model, user_emb, target_texts, ac.batch_size)
    other = reconstruction_nll(
        model, user_emb[other_histories(target_texts, ac.seed)], target_texts, ac.batch_size
    )
    fidelity.update(rec_nll=float(own.mean()), rec_nll_other=float(other.mean()),
                    rec_nll_own_wins=float((own < other).float().mean()))  # fmt: skip
    label = str(checkpoint)
    result = {
        "checkpoint": label,
        "label": Path(label).name
        if Path(label).name not in ("best", "last")
        else f"{Path(label).parent.parent.name}/{Path(label).name}",
        "fresh": fresh,
        "backbone": cfg.model.backbone,
        "preset": "none (untouched backbone)" if fresh else cfg.loss.preset,
        "prepared_dir": str(prepared.dir),
        "protocol": prepared.stats.get("protocol", ""),
        "split": ac.split,
        "probe_users": len(rows),
        "seed": ac.seed,
        "eps": ac.eps,
        "n_layers": probe.n_layers,
        "n_heads": int(probe.first.shape[1]),
        "attention": {k: v for k, v in summary.items() if k not in ("layers", "maps")},
        "layers": {k: v.tolist() for k, v in summary["layers"].items()},
        "maps": {k: v.tolist() for k, v in summary["maps"].items()},
        "r_source": r_source,
        "fidelity": fidelity,
        "examples": [{"target": t, "decoded": d} for t, d in zip(target_texts[:8], decoded[:8])],
        "heatmaps": {layer: heat[layer].numpy().tolist() for layer in layers},
    }
    del model
    return result


def _json_safe(value: Any) -> Any:
    """nan -> None, so analysis.json is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value).replace("|", "\\|")  # a literal | would split the markdown cell


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def write_report(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """analysis.md, analysis.json and the PNGs for one or two analysed checkpoints."""
    labels = [r["label"] for r in results]
    if len(set(labels)) < len(labels):
        labels = [f"{chr(65 + i)}: {lab}" for i, lab in enumerate(labels)]
    heat_path = plots.plot_history_heatmaps(
        [
            (lab, {int(k): np.array(v) for k, v in r["heatmaps"].items()})
            for lab, r in zip(labels, results)
        ],
        out_dir / "emb_attention_heatmaps.png",
    )
    sink_path = plots.plot_sink_maps(
        [
            (lab, np.array(r["maps"]["emb_first_scores"]), np.array(r["maps"]["history_scores"]))
            for lab, r in zip(labels, results)
        ],
        results[0]["eps"],
        out_dir / "sink_maps.png",
    )
    curve_path = plots.plot_layer_curves(
        [
            (lab, {key: np.array(r["layers"][key]) for key in CURVES})
            for lab, r in zip(labels, results)
        ],
        out_dir / "layer_curves.png",
    )

    first = results[0]
    lines = ["# Attention-sink and semantic-fidelity analysis", ""]
    for lab, r in zip(labels, results):
        lines.append(
            f"- **{lab}**: `{r['checkpoint']}` (backbone {r['backbone']}, preset "
            f"{r['preset']}, {r['n_layers']} layers x {r['n_heads']} heads); R: "
            f"{r['r_source']}"
        )
    lines += [
        "",
        f"Probe: {first['probe_users']} users of split `{first['split']}` of "
        f"`{first['prepared_dir']}` (seed {first['seed']}). Protocol: {first['protocol']}",
        f"Sink threshold eps = {first['eps']:g} (Gu et al., ICLR 2025). Definitions: see "
        "`karma/analysis/attention.py` and `fidelity.py`; 'all q' = mean over every query "
        "position, '`<EMB>`' = the `<EMB>` query only; history entropy renormalized over "
        "history slots; column concentration = per layer, users' renormalized `<EMB>` attention "
        "summed per history slot (top-1 share, Gini; barcode strips drive both up).",
        "",
        "## Summary (means over layers)",
        "",
    ]
    summary_rows = [
        [name, *[r["attention"].get(key, float("nan")) for r in results]]
        for key, name in LAYER_COLUMNS
    ]
    lines += _table(["metric", *labels], summary_rows)
    lines += ["", "## Semantic fidelity (greedy text decoded from R(u))", ""]
    lines += _table(
        ["metric", *labels],
        [[k, *[r["fidelity"].get(k, float("nan")) for r in results]] for k in FIDELITY_KEYS],
    )
    lines += [
        "",
        "`text_query_*`: the decoded text embedded by the item tower and used as the "
        "query over the full catalog (rank 1 = best, ties count against the target, seen "
        "items not masked); `user_query_*`: u itself as the query, for reference. "
        "`genre_any`/`genre_all`: decoded text contains at least one / every category "
        "of the target (over targets with categories). `rec_nll`: the target text's "
        "teacher-forced L_rec given R(u) (nats per token); `rec_nll_other`: the same given "
        "another probe user's R(u') (a seeded permutation without fixed points); "
        "`rec_nll_own_wins`: share of probe users whose own u gives the lower one (0.5 when u "
        "tells the decoder nothing about its target).",
        "",
    ]
    for lab, r in zip(labels, results):
        lines += [f"## Per layer: {lab}", ""]
        lines += _table(
            ["layer", *[name for _, name in LAYER_COLUMNS]],
            [
                [
                    i,
                    *[
                        r["layers"].get(key, [float("nan")] * r["n_layers"])[i]
                        for key, _ in LAYER_COLUMNS
                    ],
                ]
                for i in range(r["n_layers"])
            ],
        )
        lines += ["", f"Decoded examples ({lab}):", ""]
        lines += _table(
            ["target", "decoded from R(u)"],
            [[e["target"], e["decoded"] or "(empty)"] for e in r["examples"]],
        )
        lines.append("")
    lines += [
        "## Figures",
        "",
        f"- `{heat_path.name}`: users x history slots, `<EMB>` attention (heads averaged, "
        "rows renormalized) at layers "
        f"{', '.join(str(k) for k in first['heatmaps'])}; vertical strips = barcodes.",
        f"- `{sink_path.name}`: layer x head mean `<EMB>` attention to the first token and "
        "to the most-attended history slot; x marks sinks (> eps).",
        f"- `{curve_path.name}`: per-layer curves.",
        "",
        f"![heatmaps]({heat_path.name})",
        "",
        f"![sink maps]({sink_path.name})",
        "",
        f"![layer curves]({curve_path.name})",
        "",
    ]
    report = out_dir / "analysis.md"
    report.write_text("\n".join(lines))
    numbers = [{k: v for k, v in r.items() if k != "heatmaps"} for r in results]
    (out_dir / "analysis.json").write_text(json.dumps(_json_safe(numbers), indent=1))
    return report


def analyze(
    checkpoint: str | Path,
    compare: str | Path | None = None,
    out_dir: str | Path = "runs/analysis",
    overrides: list[str] | None = None,
) -> Path:
    """Analyse `checkpoint` (and `compare`, side by side); returns out_dir, which then holds
    analysis.md, analysis.json, emb_attention_heatmaps.png, sink_maps.png, layer_curves.png."""
    out_dir = ensure_output_dir(out_dir, "--out")
    results = [analyze_checkpoint(checkpoint, overrides)]
    if compare is not None:
        results.append(analyze_checkpoint(compare, overrides))
    report = write_report(results, out_dir)
    print(f"analysis written to {report}")
    return out_dir
