"""Attention-sink and semantic-fidelity analysis of KARMA checkpoints (DESIGN.md, "Diagnostics").

    from karma.analysis import analyze, SinkMonitor
    analyze("runs/karma/checkpoints/best", compare="runs/ao/checkpoints/best",
            out_dir="runs/analysis")                   # analysis.md, analysis.json, PNGs
    train(cfg, monitor=SinkMonitor.from_config)        # training-time probe (see monitor.py)

Modules: `attention` (pure metrics over attention tensors), `fidelity` (text metrics, ranks of
decoded texts, post-hoc fit of R; greedy decoding itself is karma.inference), `collect`
(eager-attention forward of a KarmaModel), `plots` (PNGs), `monitor` (training-time probe),
`run` (`analyze`, `karma analyze`).
"""

from karma.analysis.monitor import ProbeBatch, SinkMonitor, build_probe_batch, probe
from karma.analysis.run import analyze, analyze_checkpoint

__all__ = [
    "ProbeBatch",
    "SinkMonitor",
    "analyze",
    "analyze_checkpoint",
    "build_probe_batch",
    "probe",
]
