"""`kn-dist` command line. Each subcommand parses its arguments and calls one library function.

Imports are lazy so `kn-dist models` does not pay for Ray and MLflow. A `UserError` anywhere
becomes one line on stderr and exit code 2 (bad input); anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kn_dist.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_TARGETS = ("layers", "models", "data", "ray", "tune", "startup", "gpu", "precision", "compile")


def _cmd_train(args: argparse.Namespace) -> int:
    from kn_dist import config

    # Validate the config before importing torch/Ray/MLflow, so a typo is reported at once.
    cfg = config.load(args.config, args.overrides)
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    from kn_dist.trainer import run_training

    run_training(cfg, address=args.address, resume=args.resume)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from kn_dist.tune import run_sweep

    run_sweep(args.sweep, args.overrides, tracking_uri=args.tracking_uri, address=args.address, resume=args.resume)
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from kn_dist.study import run_study

    run_study(
        args.study,
        args.overrides,
        tracking_uri=args.tracking_uri,
        address=args.address,
        resume=args.resume,
        report_dir=args.report_dir,
    )
    return 0


def _cmd_best(args: argparse.Namespace) -> int:
    from kn_dist.report import best_command

    return best_command(
        tracking_uri=args.tracking_uri, experiment=args.experiment, model=args.model, norm=args.norm, out=args.out
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from kn_dist.report import write_report

    path = write_report(tracking_uri=args.tracking_uri, experiment=args.experiment, out_dir=args.out)
    print(f"report written to {path}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from kn_dist.summary import write_summary

    write_summary(args.tracking_uri, args.out)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from kn_dist.models.summary import format_table

    try:
        print(format_table(family=args.family))
    except ValueError as err:  # an unknown family: models/ cannot raise our UserError itself
        raise UserError(str(err)) from None
    return 0


def _cmd_data_write(args: argparse.Namespace) -> int:
    from kn_dist.data import write_dataset

    paths = write_dataset(
        args.dataset,
        args.out,
        source_dir=args.source,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability,
        num_samples=args.num_samples,
        image_size=args.image_size,
        **({"val_fraction": args.val_fraction} if args.val_fraction is not None else {}),
    )
    for path in paths:
        print(path)
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from kn_dist.data import inspect_beton, inspect_dataset

    target = Path(args.path)
    print(json.dumps(inspect_dataset(target) if target.is_dir() else inspect_beton(target), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import contextlib
    import importlib

    if args.compile and args.target != "models":
        raise UserError(f"--compile applies to `kn-dist bench models` only, not to bench {args.target!r}")
    module = importlib.import_module(f"kn_dist.bench.{args.target}")
    options = {"compile": True} if args.compile else {}
    # stdout carries the one JSON object; progress lines and Tune's tables of the Ray benches go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = module.run(quick=args.quick, **options)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_cluster_check(args: argparse.Namespace) -> int:
    import yaml

    from kn_dist.clusters import placeholders, validate_cluster_yaml

    for path in args.files:
        validate_cluster_yaml(path)
        todo = placeholders(yaml.safe_load(Path(path).read_text()))
        print(f"{path}: ok" + (f"; still to fill in: {', '.join(todo)}" if todo else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kn_dist.demo import run_demo

    return run_demo()


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other kn-dist error) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("kn-dist").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"kn-dist: error: {where}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="kn-dist", description="KernelNorm vs. standard normalisation at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one config under Ray Train, tracked in MLflow")
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.05")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="run a Ray Tune sweep (experiments/sweeps/*.yaml)")
    p.add_argument("sweep")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--tracking-uri")
    p.add_argument("--address")
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep of the same name")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("study", help="sweep, selection on val, finals x seeds on test, the report (DESIGN.md §8)")
    p.add_argument("study", help="study YAML (experiments/studies/*.yaml): a sweep file plus a study: section")
    p.add_argument("overrides", nargs="*", help="key=value overrides; study.* and tune.* reach their sections")
    p.add_argument("--tracking-uri")
    p.add_argument("--address")
    p.add_argument("--resume", action="store_true", help="finish a killed study without redoing finished runs")
    p.add_argument("--report-dir", help="where report.md and the plots go (default: reports/<study name>)")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("best", help="best configuration per (architecture, norm) from MLflow")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", help="MLflow experiment (default: the latest sweep)")
    p.add_argument("--model")
    p.add_argument("--norm")
    p.add_argument("--out", help="write the best config as a YAML that `kn-dist train` accepts")
    p.set_defaults(func=_cmd_best)

    p = sub.add_parser("report", help="comparison tables and plots from MLflow")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment")
    p.add_argument("--out", required=True, help="output directory for report.md and PNG plots")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("summary", help="every study in the MLflow store on one page: table, forest plot, IQM")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--out", required=True, help="output directory for summary.md and forest.png")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("models", help="table of registered models: norms, parameters, FLOPs")
    p.add_argument("--family")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("data", help="write or inspect FFCV .beton datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    w = data_sub.add_parser("write", help="write train.beton, val.beton, test.beton and splits.json under --out")
    w.add_argument("dataset", choices=["digits", "cifar10", "cifar100", "imagefolder", "synthetic"])
    w.add_argument("--out", required=True)
    w.add_argument("--source", help="imagefolder: class-folder root; cifar: download/cache dir")
    w.add_argument("--max-side", type=int, default=256, help="imagefolder: longest side after resize")
    w.add_argument("--jpeg-quality", type=int, default=90, help="imagefolder: JPEG quality")
    w.add_argument(
        "--compress-probability",
        type=float,
        default=1.0,
        help="imagefolder: share of images stored as JPEG, the rest raw (ffcv-imagenet: 0.1 at 400 px for "
        "ResNet-18, 0.5 at 500 px for ResNet-50; default 1 = all JPEG)",
    )
    w.add_argument("--num-samples", type=int, default=None, help="synthetic: number of images")
    w.add_argument("--image-size", type=int, default=None, help="synthetic/digits: side length")
    w.add_argument(
        "--val-fraction", type=float, help="imagefolder without its own val/: share of train/ held out (default 0.1)"
    )
    w.set_defaults(func=_cmd_data_write)
    i = data_sub.add_parser("inspect", help="a dataset directory's splits and sizes, or one .beton's fields")
    i.add_argument("path", help="a dataset directory (data/<dataset>) or a .beton file")
    i.set_defaults(func=_cmd_data_inspect)

    p = sub.add_parser("bench", help="benchmarks; print one JSON object")
    p.add_argument("target", choices=BENCH_TARGETS)
    p.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke check")
    p.add_argument("--compile", action="store_true", help="bench models: torch.compile both models of each pair")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("cluster", help="check cluster files before `ray up` / `kubectl apply`")
    cluster_sub = p.add_subparsers(dest="cluster_command", required=True)
    c = cluster_sub.add_parser("check", help="Ray's cluster-config schema, pinned images, nothing open to 0.0.0.0/0")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=_cmd_cluster_check)

    p = sub.add_parser("demo", help="the main job on embedded defaults (digits, local Ray, local MLflow)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, accepting `key=value` overrides anywhere on the line (as Hydra-style tools do), not only
    before the first option: `kn-dist train cfg.yaml --tracking-uri X optim.lr=0.1` works."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [item for item in extra if "=" in item and not item.startswith("-")]
        unknown = [item for item in extra if item not in overrides]
        if unknown or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    from kn_dist.runtime import mark, quiet_ray_logs

    mark("cli_started")  # after Python and kn_dist.cli's own imports
    quiet_ray_logs()  # Ray's and MLflow's INFO records stay off the console from the start
    args = _parse(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"kn-dist: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
