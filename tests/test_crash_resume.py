"""kill -9 a training run (mid checkpoint write, then mid step), `--resume` it, and get the same
final weights as a run that was never interrupted, bit for bit, on CPU.

Each run is a real `python -m karma train` process on the tiny random backbone
(configs/debug.yaml) and a tiny generated dataset. The child kills itself with SIGKILL at an
exact moment, chosen from outside karma: a wrapper around `torch.save` writes half of
`state.pt` and dies, or a wrapper around `Tensor.backward` dies during a given step. Nothing in
karma knows about it, as in a real crash.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# argv: mode (none | checkpoint | step), N, then the `karma` arguments.
# checkpoint: die half-way through writing the N-th state.pt; step: die in the N-th backward.
CHILD = r"""
import io, os, signal, sys
import torch

mode, at = sys.argv[1], int(sys.argv[2])
calls = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "checkpoint":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        global calls
        if str(f).endswith("state.pt"):
            calls += 1
            if calls == at:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                die()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode == "step":
    real_backward = torch.Tensor.backward
    def backward(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == at:
            die()
        return real_backward(self, *args, **kwargs)
    torch.Tensor.backward = backward

from karma.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _write_dataset(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    items = ["item_id,title,category"] + [f"m{i},Movie {i},G{i % 4}" for i in range(24)]
    inter = ["user_id,item_id,timestamp"]
    for u in range(10):
        for t, i in enumerate(rng.permutation(24)[:7]):
            inter.append(f"u{u},m{i},{100 * u + t}")
    (root / "items.csv").write_text("\n".join(items) + "\n")
    (root / "interactions.csv").write_text("\n".join(inter) + "\n")
    return root / "items.csv", root / "interactions.csv"


def _start(mode: str, at: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD, mode, str(at), "train", *args]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, returncode: int) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == returncode, out
    return out


def _step(ckpt_dir: Path) -> int:
    return int(torch.load(ckpt_dir / "state.pt", weights_only=True)["step"])


def test_kill_9_during_checkpoint_and_step_then_resume_matches(tmp_path: Path) -> None:
    items, inter = _write_dataset(tmp_path / "data")
    common = [
        "--config", "configs/debug.yaml",
        "data.source=files", f"data.items_path={items}", f"data.interactions_path={inter}",
        "data.max_history=5", "model.emb_dim=32", "model.max_item_tokens=16",
        "model.max_target_tokens=16", "train.steps=9", "train.batch_size=4",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.save_every=3",
    ]

    def args(name: str) -> list[str]:
        return [*common, f"data.prepared_dir={tmp_path / name / 'data'}",
                f"train.output_dir={tmp_path / name}"]

    straight = _start("none", 0, args("straight"))
    # (a) dies half-way through writing the step-6 checkpoint's state.pt (the 2nd save)
    crashed = _start("checkpoint", 2, args("crashed"))
    _finish(straight, 0)
    _finish(crashed, -signal.SIGKILL)
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert _step(ckpts / "last") == 3
    assert [p.name for p in ckpts.glob("last.tmp-*")], "the kill did not land mid-write"

    # (b) resumed from step 3, dies inside step 8 (its 5th backward), after the step-6 save
    _finish(_start("step", 5, ["--resume", *args("crashed")]), -signal.SIGKILL)
    assert _step(ckpts / "last") == 6
    log = [json.loads(line) for line in (tmp_path / "crashed" / "log.jsonl").open()]
    assert log[-1]["step"] == 7

    _finish(_start("none", 0, ["--resume", *args("crashed")]), 0)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"]  # crash leftovers cleaned up
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(ckpts / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logs = [
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").open()]
        for run in ("straight", "crashed")
    ]
    assert [r["step"] for r in logs[1]] == list(range(1, 10))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
