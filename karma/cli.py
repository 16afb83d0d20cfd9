"""The `karma` command line. Each subcommand parses arguments and calls one public function.

    karma data prepare --config configs/ml100k.yaml data.query_mode=none
    karma data stats runs/data/ml-100k
    karma shop --items 2000 --out runs/shop      # simulated shop (then data.source=shop)
    karma train --config configs/debug.yaml loss.preset=karma [--resume]
    torchrun --nproc_per_node=2 -m karma train --config configs/debug.yaml
    karma eval --checkpoint runs/train/checkpoints/best
    karma export --checkpoint runs/train/checkpoints/best --out runs/export
    karma baseline sasrec --config configs/ml100k.yaml
    karma experiment --config configs/ml100k.yaml methods=[popularity,sasrec] seeds=[0,1,2]
    karma analyze --checkpoint A --compare B --out runs/analysis
    karma funnel --checkpoint A --compare B --out runs/funnel funnel.max_users=200
    karma serve --checkpoint runs/train/checkpoints/best [--export runs/export] serve.port=8000
    karma backbones list
    karma demo

Heavy imports (torch, transformers) happen inside the handlers so that `karma --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from karma.config import load_config
from karma.errors import user_message

REPORT_BUG = (
    "karma: internal error (a bug in karma, not in your input): please report it to the karma "
    "maintainers with the command line and the traceback above"
)


def _add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from karma.data import format_stats, prepare_dataset

    cfg = load_config(args.config, args.overrides)
    out = prepare_dataset(cfg)
    print(format_stats(out))
    print(f"prepared dataset written to {out}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from karma.data import format_stats

    print(format_stats(args.dir))
    return 0


def _cmd_shop(args: argparse.Namespace) -> int:
    from karma.datasets.shop import ShopConfig, generate_shop, synthetic_pictures

    cfg = ShopConfig(
        items=args.items,
        users=args.users,
        requests_per_user=args.requests_per_user,
        seed=args.seed,
        colour_missing=args.colour_missing,
        cold_share=args.cold_share,
        query_share=args.query_share,
        oracle_users=args.oracle_users,
        images=not args.no_images,
    )
    pictures = synthetic_pictures(seed=args.seed) if args.pictures == "synthetic" else None
    summary = generate_shop(cfg, args.out, pictures=pictures, fashion_mnist=args.fashion_mnist)
    print(
        f"simulated shop written to {args.out}: {summary['items']:,} items, "
        f"{summary['users']:,} users, {summary['clicks']:,} clicks in {summary['requests']:,} "
        f"requests ({summary['seconds']:.0f} s)"
    )
    print(f"next: karma data prepare --config configs/shop.yaml data.path={args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from karma.train import train

    cfg = load_config(args.config, args.overrides)
    monitor = None
    if cfg.train.monitor_every > 0:
        from karma.analysis import SinkMonitor

        monitor = SinkMonitor.from_config
    train(cfg, resume=args.resume, monitor=monitor)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from karma.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, overrides=args.overrides, out_dir=args.out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from karma.evaluate import export_embeddings

    export_embeddings(args.checkpoint, out_dir=args.out, fmt=args.format, overrides=args.overrides)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from karma.baselines import run_baseline

    cfg = load_config(args.config, args.overrides)
    run_baseline(args.name, cfg, out_dir=args.out)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from karma.report import run_experiment

    grid = {}
    rest = []
    for text in args.overrides:
        key = text.split("=", 1)[0]
        if key in ("methods", "seeds"):
            grid[key] = text.split("=", 1)[1]
        else:
            rest.append(text)
    cfg = load_config(args.config, rest)
    run_experiment(cfg, methods=grid.get("methods"), seeds=grid.get("seeds"), out_dir=args.out)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from karma.analysis import analyze

    analyze(args.checkpoint, compare=args.compare, out_dir=args.out, overrides=args.overrides)
    return 0


def _cmd_funnel(args: argparse.Namespace) -> int:
    from karma.funnel import run_funnel

    run_funnel(args.checkpoint, compare=args.compare, out_dir=args.out, overrides=args.overrides)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from karma.serve import serve

    cfg = load_config(args.config, args.overrides)
    cfg.serve.checkpoint = args.checkpoint
    if args.export is not None:
        cfg.serve.export = args.export
    serve(cfg)
    return 0


def _cmd_backbones_list(args: argparse.Namespace) -> int:
    from karma.backbones import format_backbones

    print(format_backbones())
    return 0


def _cmd_backbones_convert(args: argparse.Namespace) -> int:
    from karma.backbones import ensure_backbone

    print(ensure_backbone(args.name))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from karma.demo import run_demo

    run_demo(args.config, args.overrides, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karma", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare and inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="validate, split and write a prepared dataset")
    _add_config_args(p)
    p.set_defaults(func=_cmd_data_prepare)
    p = data_sub.add_parser("stats", help="print the stats of a prepared dataset")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_data_stats)

    p = sub.add_parser("shop", help="generate the simulated shop (items, images, clicks, oracle)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--users", type=int, default=0, help="0: items / 2, at least 100")
    p.add_argument("--requests-per-user", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--colour-missing", type=float, default=0.3, help="titles without the colour")
    p.add_argument("--cold-share", type=float, default=0.2, help="items arriving during the run")
    p.add_argument("--query-share", type=float, default=0.7, help="typed queries vs feed visits")
    p.add_argument("--oracle-users", type=int, default=5000)
    p.add_argument("--no-images", action="store_true", help="no pictures, no image column")
    p.add_argument("--pictures", choices=["fashion-mnist", "synthetic"], default="fashion-mnist")
    p.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist")
    p.set_defaults(func=_cmd_shop)

    p = sub.add_parser("train", help="train a KARMA model (DDP under torchrun)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/last")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="full-catalog retrieval evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="directory for metrics.json (default: checkpoint)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="write item and user embeddings with id maps")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["parquet", "npy"], default="parquet")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("baseline", help="run a baseline on the identical split")
    p.add_argument("name", choices=["popularity", "sasrec", "frozen", "minilm"])
    p.add_argument("--out", default=None)
    _add_config_args(p)
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser("experiment", help="run a methods x seeds grid and write report.md")
    p.add_argument("--out", default=None)
    _add_config_args(p)
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("analyze", help="attention-sink and semantic-fidelity analysis")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or backbone name")
    p.add_argument("--compare", default=None)
    p.add_argument("--out", default="runs/analysis")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("funnel", help="recall, pre-ranking and ranking of one or two checkpoints")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--compare", default=None, help="a second checkpoint, shown side by side")
    p.add_argument("--out", default="runs/funnel")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. funnel.max_users=200")
    p.set_defaults(func=_cmd_funnel)

    p = sub.add_parser("serve", help="HTTP search API and search page for a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--export", default=None, help="a `karma export` dir whose index is loaded")
    _add_config_args(p)
    p.set_defaults(func=_cmd_serve)

    bb = sub.add_parser("backbones", help="list and convert pretrained backbones")
    bb_sub = bb.add_subparsers(dest="backbones_command", required=True)
    p = bb_sub.add_parser("list")
    p.set_defaults(func=_cmd_backbones_list)
    p = bb_sub.add_parser("convert")
    p.add_argument("name")
    p.set_defaults(func=_cmd_backbones_convert)

    p = sub.add_parser("demo", help="the main job: action_only vs karma on ML-100K")
    p.add_argument("--out", default="runs/demo")
    _add_config_args(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`--config c.yaml a.b=1 --out d a.c=2`); argparse stops
    # the positional list at the first option, so collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("karma: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            # Not the user's input: a bug in karma. Keep the traceback, it is what a fix needs.
            traceback.print_exc()
            print(REPORT_BUG, file=sys.stderr)
            return 1
        # Bad input: one clear line naming the file/row/field or config key, no traceback.
        print(f"karma: error: {message}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
