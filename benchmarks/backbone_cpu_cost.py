"""CPU cost of the backbone for the demo recipe: forward and forward+backward per batch shape.

    .venv/bin/python benchmarks/backbone_cpu_cost.py                      # SmolLM2-135M, 2 threads
    .venv/bin/python benchmarks/backbone_cpu_cost.py --threads 1 2 --repeats 3 \
        --out benchmarks/results/backbone_cpu_cost.md

Measures, for each training mode -- full fine-tune, `freeze_layers=24` (embeddings and the lower
24 of 30 layers frozen), LoRA r=16 on every attention and MLP projection -- the wall time of:
  item      item tower: 64 item texts x 21 tokens (ML-100K titles are ~15-20 tokens + <ITEM>)
  user      user prompt: 16 x 45 positions, 20 of them history tokens fed via `inputs_embeds`
            that require grad (they come from a trainable projection P_h), last hidden state
  user+gen  the same prompt with `Next: {target text} <eos>` appended (16 x 65), LM-head CE on
            the 20 target tokens (the L_gen pass of the karma preset)
  rec       reconstruction pass: 16 x (2 soft tokens + 20 text tokens), LM-head CE (L_rec)
  adamw     one AdamW step over the trainable parameters
and the time to encode the whole ML-100K catalog (1,682 real titles, batch 64, no grad).
Forward-only is under `torch.no_grad()` (the inference path); forward+backward is one training
forward plus `loss.backward()`. Set OMP_WAIT_POLICY=PASSIVE in the environment when the CPU is
shared: with the default (spinning) OpenMP workers, 2 threads on a busy 2-core machine ran a
SmolLM2 forward 5-20x slower than 1 thread. Each figure is the median of `--repeats` runs after
one warm-up, with min-max: other processes on the machine show up as spread, and the load average
is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from karma.backbones import load_backbone
from karma.report import cpu_name

MODES = ("full", "freeze24", "lora16")
SHAPES = {"item": (64, 21), "user": (16, 45), "user+gen": (16, 65), "rec": (16, 22)}
HISTORY = 20  # history positions in the user prompt
TARGET = 20  # target-text tokens scored by the LM head (gen, rec)


def prepare(backbone: str, mode: str):
    """Load a fresh backbone and make the parameters of `mode` trainable."""
    model, tokenizer = load_backbone(backbone)
    if mode == "freeze24":
        # requires_grad=False on embeddings + lower layers: autograd records nothing there unless
        # an input below them requires grad (the history tokens of the user prompt do).
        model.get_input_embeddings().requires_grad_(False)
        for layer in model.model.layers[:24]:
            layer.requires_grad_(False)
    elif mode == "lora16":
        from peft import LoraConfig, inject_adapter_in_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        model.requires_grad_(False)
        model = inject_adapter_in_model(config, model)  # only lora_A / lora_B are trainable
    model.train()
    return model, tokenizer


def make_step(model, workload: str, backward: bool) -> Callable[[], None]:
    """A closure running one batch of `workload` (inputs fixed, random token ids)."""
    batch, length = SHAPES[workload]
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (batch, length), generator=gen)
    embed = model.get_input_embeddings()
    body = model.model  # decoder without LM head: last hidden states

    def inputs_embeds() -> torch.Tensor:
        x = embed(ids)  # (B, T, d)
        if workload in ("user", "user+gen"):
            # History tokens from a trainable projection: gradients must reach them.
            hist = torch.randn(batch, HISTORY, x.shape[-1], generator=gen).requires_grad_(backward)
            x = torch.cat([x[:, :10], hist, x[:, 10 + HISTORY :]], dim=1)
        elif workload == "rec":
            soft = torch.randn(batch, 2, x.shape[-1], generator=gen).requires_grad_(backward)
            x = torch.cat([soft, x[:, 2:]], dim=1)
        return x

    def run() -> None:
        with torch.set_grad_enabled(backward):
            x = inputs_embeds()
            if workload in ("item", "user"):
                hidden = body(inputs_embeds=x).last_hidden_state[:, -1]  # (B, d)
                loss = hidden.pow(2).mean()
            else:
                labels = ids.clone()
                labels[:, :-TARGET] = -100  # CE only on the target text
                loss = model(inputs_embeds=x, labels=labels).loss
            if backward:
                loss.backward()
                model.zero_grad(set_to_none=True)

    return run


def make_optimizer_step(model) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return optimizer.step


def time_it(fn: Callable[[], None], repeats: int) -> tuple[float, float, float, float]:
    """(median wall, min wall, max wall, median process CPU time) in seconds, after a warm-up.

    CPU time counts the work of all our threads whoever else runs on the machine, so on a shared
    CPU it is the steadier figure (with OMP_WAIT_POLICY=PASSIVE idle workers do not burn it).
    """
    fn()  # warm-up: allocator, kernels, lazy init
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), min(walls), max(walls), statistics.median(cpus)


def catalog_texts() -> list[str]:
    """The 1,682 ML-100K items as `Title (year) | Genre, Genre` from the recbole wheel."""
    import importlib.util

    found = importlib.util.find_spec("recbole")
    if found is None:
        raise SystemExit("needs recbole==1.2.1 installed --no-deps (it ships ML-100K)")
    path = Path(found.origin).parent / "dataset_example" / "ml-100k" / "ml-100k.item"
    texts = []
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:
        _, title, year, genres = line.split("\t")
        texts.append(f"{title} ({year}) | {', '.join(genres.split())}")
    return texts


def encode_catalog_seconds(backbone: str, batch_size: int = 64) -> tuple[float, float, int, float]:
    """Wall and CPU seconds of one no-grad pass over the catalog, texts sorted by length."""
    model, tokenizer = load_backbone(backbone)
    # A trailing special token stands in for <ITEM> (the model adds its own).
    texts = sorted((t + tokenizer.eos_token for t in catalog_texts()), key=len)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
            model.model(**enc)  # (B, T, d) last hidden states; the cost is all we need
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, len(texts), sum(lengths) / len(lengths)


def fmt(t: tuple[float, float, float, float]) -> str:
    """`wall s (min-max) / cpu s`."""
    median, low, high, cpu = t
    return f"{median:.2f} ({low:.2f}-{high:.2f}) / {cpu:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = parser.parse_args()

    cpu = cpu_name()
    lines = [
        f"## {args.backbone}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
        f"load average at start {os.getloadavg()[0]:.1f}. {args.repeats} timed runs after a "
        "warm-up.",
        "",
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        lines += [
            f"### torch threads = {threads}",
            "",
            "Seconds per batch: wall median (min-max) / process CPU time median.",
            "",
            "| workload (B x T) | forward, no grad | "
            + " | ".join(f"fwd + bwd, {mode}" for mode in args.modes)
            + " |",
            "| --- | ---: |" + " ---: |" * len(args.modes),
        ]
        models = {}
        optim_rows = []
        for mode in args.modes:
            models[mode], _ = prepare(args.backbone, mode)
        for workload, (batch, length) in SHAPES.items():
            # The no-grad forward is the inference path: the same for every mode (LoRA aside).
            cells = [fmt(time_it(make_step(models[args.modes[0]], workload, False), args.repeats))]
            for mode in args.modes:
                cells.append(fmt(time_it(make_step(models[mode], workload, True), args.repeats)))
            lines.append(f"| {workload} ({batch} x {length}) | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        for mode in args.modes:
            trainable = sum(p.numel() for p in models[mode].parameters() if p.requires_grad)
            step = time_it(make_optimizer_step(models[mode]), args.repeats)
            optim_rows.append(f"| {mode} | {trainable:,} | {fmt(step)} |")
            print(optim_rows[-1], flush=True)
        del models
        lines += ["", "| mode | trainable params | AdamW step, s |", "| --- | ---: | ---: |"]
        lines += optim_rows
        wall, cpu, n_items, mean_len = encode_catalog_seconds(args.backbone)
        lines += [
            "",
            f"Catalog encoding (ML-100K, {n_items} items, mean {mean_len:.1f} tokens, batch 64, "
            f"sorted by length, no grad): {wall:.1f} s wall / {cpu:.1f} s CPU.",
            f"Load average at end: {os.getloadavg()[0]:.1f}.",
            "",
        ]
        print(lines[-3], lines[-2], flush=True)
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
