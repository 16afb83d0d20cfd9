"""How fast does `karma data prepare` compute frozen image features on this machine? (issue 11,
part 1: EfficientNet-Lite0 feature extraction throughput)

    .venv/bin/python benchmarks/image_features.py --out benchmarks/results/image_features_cpu.md
    .venv/bin/python benchmarks/image_features.py --images 32 --threads 1     # quick smoke run

Times `karma.images.encode_images` (decode + our preprocessing + the encoder forward pass) on
generated product pictures written as PNG files: small 28x28 ones (the simulated shop's
Fashion-MNIST pictures) and 512x512 ones (a typical product photo), for each batch size and
torch thread count. One warm-up batch is not timed. Wall time and process CPU seconds are both
reported: the machine may be shared, and CPU seconds / threads estimates an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from karma.images import encode_images, load_image_encoder  # noqa: E402
from karma.report import cpu_name  # noqa: E402


def write_pictures(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """`n` coloured random blobs on white, `size` x `size`, as PNG files."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = np.full((size, size, 3), 255, dtype=np.uint8)
        a, b = sorted(rng.integers(0, size, 2))
        pixels[a : b + 1, size // 4 : 3 * size // 4] = rng.integers(0, 255, 3)
        path = folder / f"{size}-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="write a Markdown table here")
    args = parser.parse_args()

    encoder = load_image_encoder()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            paths = write_pictures(Path(tmp), args.images, size)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch_size in args.batch_sizes:
                    encode_images(paths[:batch_size], encoder, batch_size, progress=False)
                    wall, cpu = time.perf_counter(), time.process_time()
                    encode_images(paths, encoder, batch_size, progress=False)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    rows.append((size, threads, batch_size, args.images / wall, wall, cpu))
                    print(
                        f"{size}px threads={threads} batch={batch_size}: "
                        f"{args.images / wall:.1f} img/s ({wall:.1f} s wall, {cpu:.1f} s CPU)"
                    )

    lines = [
        "# Image feature extraction throughput (EfficientNet-Lite0, 224x224 input)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}. "
        "Shared with other jobs while measured: wall time is an upper bound, CPU seconds / "
        "threads the idle-machine estimate.",
        f"Command: `python benchmarks/image_features.py --images {args.images}`",
        "",
        "| picture | threads | batch | img/s (wall) | wall s | CPU s | img/s (CPU-s based) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, threads, batch_size, rate, wall, cpu in rows:
        cpu_rate = args.images * threads / cpu if cpu > 0 else float("nan")
        lines.append(
            f"| {size}x{size} PNG | {threads} | {batch_size} | {rate:.1f} | {wall:.1f} | "
            f"{cpu:.1f} | {cpu_rate:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
