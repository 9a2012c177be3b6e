"""Command line: parses arguments into a command's config dataclass and calls the Python API. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys

from .data.download import DownloadError
from .data.extract import ExtractionError
from .data.prepare import PrepareError
from .data.records import DatasetError


def _flag(parser, name: str, **kwargs):
    """Accept the reference script's underscore spelling and the dashed one."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, default=None, **kwargs)


def _ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"K values must be positive integers, got {text!r}")
    return ks


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an embedder (the reference script's flags)",
                                   description="Train with normalized softmax. Flags given explicitly override --recipe.")
    _flag(parser, "recipe", choices=["cub200", "cars196", "sop", "inshop"], help="the paper's hyperparameters for a benchmark")
    _flag(parser, "dataset", help="Cub200, Cars196, StanfordOnlineProducts, InShop, folder or csv")
    _flag(parser, "dataset_root", help="dataset folder (or CSV file for --dataset csv)")
    _flag(parser, "dim", type=int)
    _flag(parser, "model_name", help="resnet18, resnet50, resnet101, or a timm model name")
    _flag(parser, "weights", help="imagenet, none, or a state-dict file")
    _flag(parser, "epochs_per_step", type=int)
    _flag(parser, "num_steps", type=int)
    _flag(parser, "pretrain_epochs", type=int)
    _flag(parser, "test_every_n_epochs", type=int)
    _flag(parser, "lr", type=float)
    _flag(parser, "lr_mult", type=float)
    _flag(parser, "gamma", type=float)
    _flag(parser, "class_balancing", action=argparse.BooleanOptionalAction)
    _flag(parser, "images_per_class", type=int)
    _flag(parser, "batch_size", type=int)
    _flag(parser, "output", help="runs go to OUTPUT/<dataset>/<dim>/<model>_<batch> (default runs)")
    _flag(parser, "run_dir", help="an explicit run directory instead")
    _flag(parser, "device", help="auto, cpu, cuda, cuda:1, ...")
    _flag(parser, "workers", type=int, help="data-loading processes (default: one per core, at most 8)")
    _flag(parser, "seed", type=int)
    _flag(parser, "temperature", type=float)
    _flag(parser, "class_sample_fraction", type=float, help="score the batch's classes plus this fraction of the others")
    _flag(parser, "optimizer", choices=["sgd", "adamw"])
    _flag(parser, "scheduler", choices=["step", "cosine"])
    _flag(parser, "weight_decay", type=float)
    _flag(parser, "resize", type=int)
    _flag(parser, "crop", type=int)
    _flag(parser, "hflip", action=argparse.BooleanOptionalAction)
    _flag(parser, "keep_aspect", action=argparse.BooleanOptionalAction, help="resize the shorter side instead of to a square")
    _flag(parser, "amp", choices=["none", "bf16", "fp16"])
    _flag(parser, "channels_last", action=argparse.BooleanOptionalAction)
    _flag(parser, "eval_batch_size", type=int)
    _flag(parser, "ks", type=_ks, help="Recall@K cut-offs, e.g. 1,2,4,8")
    _flag(parser, "nmi", action=argparse.BooleanOptionalAction)
    _flag(parser, "verify_images", action=argparse.BooleanOptionalAction)
    _flag(parser, "use_cache", action=argparse.BooleanOptionalAction)
    _flag(parser, "resume", help="a checkpoint file or a run directory to continue")
    _flag(parser, "max_steps_per_epoch", type=int)
    _flag(parser, "keep_checkpoints", type=int)
    _flag(parser, "progress", action=argparse.BooleanOptionalAction)
    parser.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    from .config import TrainConfig, apply_recipe
    from .training import train

    explicit = {key: value for key, value in vars(args).items() if key not in ("handler", "command") and value is not None}
    config = apply_recipe(TrainConfig(), explicit)
    summary = train(config)
    if summary["is_main"]:
        print(f"run directory: {summary['run_dir']}")
    return 0


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Recall@K, MAP@R, R-precision, NMI from a checkpoint or saved embeddings")
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint file or run directory")
    _flag(parser, "embeddings", help="an .npz of embeddings to evaluate instead of a checkpoint")
    _flag(parser, "dataset", help="default: the dataset the checkpoint was trained on")
    _flag(parser, "dataset_root")
    parser.add_argument("--k", "--ks", dest="ks", type=_ks, default=None, help="Recall@K cut-offs, e.g. 1,2,4,8")
    _flag(parser, "batch_size", type=int)
    _flag(parser, "device")
    _flag(parser, "workers", type=int)
    _flag(parser, "amp", choices=["none", "bf16", "fp16"])
    _flag(parser, "binary", action=argparse.BooleanOptionalAction)
    _flag(parser, "nmi", action=argparse.BooleanOptionalAction)
    _flag(parser, "save_embeddings", help="write the embeddings to this .npz")
    parser.add_argument("--output", dest="output_json", default=None, help="write the evaluation object to this JSON file")
    parser.add_argument("--json", dest="print_json", action="store_true", default=None, help="print the evaluation object as JSON")
    _flag(parser, "use_cache", action=argparse.BooleanOptionalAction)
    _flag(parser, "progress", action=argparse.BooleanOptionalAction)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> int:
    import dataclasses

    from .config import EvaluateConfig
    from .evaluate_command import run_evaluation

    explicit = {key: value for key, value in vars(args).items() if key not in ("handler", "command") and value is not None}
    config = dataclasses.replace(EvaluateConfig(), **explicit)
    result, text = run_evaluation(config)
    if config.print_json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(text))
    return 0


def _add_demo(subparsers) -> None:
    from .config import DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser("demo", help="train on generated glyph images and compare with raw pixels and an untrained net")
    parser.add_argument("--output", default=defaults.output, help=f"output folder (default {defaults.output})")
    parser.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=defaults.num_classes)
    parser.add_argument("--images-per-class", "--images_per_class", dest="images_per_class", type=int, default=defaults.images_per_class)
    parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=defaults.image_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from .config import DemoConfig
    from .demo import run_demo

    config = DemoConfig(output=args.output, num_classes=args.num_classes, images_per_class=args.images_per_class,
                        image_size=args.image_size, epochs=args.epochs, seed=args.seed, workers=args.workers,
                        device=args.device, progress=args.progress)
    run_demo(config)
    return 0


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="download, verify, extract and check a benchmark dataset (safe to re-run and to interrupt)",
        description="Prepare a benchmark under --root, or re-verify a prepared copy with --check DIR.")
    parser.add_argument("dataset", nargs="?", help="cub200, cars196, sop or inshop")
    parser.add_argument("--root", help="where archives, data and manifest.json go (default data/<dataset>)")
    parser.add_argument("--url", dest="urls", action="append", default=[], help="download from here instead (repeatable)")
    parser.add_argument("--from-archive", "--from_archive", dest="from_archives", nargs="+", action="extend", default=[],
                        help="archives/files downloaded by hand")
    parser.add_argument("--sha256", action="append", default=[], help="expected SHA-256: HEX, or FILENAME=HEX (repeatable)")
    parser.add_argument("--check", nargs="?", const="", default=None, metavar="DIR",
                        help="re-verify every image and the counts (of DIR, or of the prepared --root)")
    parser.add_argument("--cache", action="store_true", help="also write the pre-resized uint8 image cache")
    parser.add_argument("--cache-keep-aspect", "--cache_keep_aspect", dest="cache_keep_aspect", action="store_true",
                        help="cache with the shorter side at --cache-size instead of a square")
    parser.add_argument("--cache-size", "--cache_size", dest="cache_size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--keep-archives", "--keep_archives", dest="keep_archives", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> int:
    from .config import DEFAULT_DATASET_ROOTS
    from .data.benchmarks import canonical_dataset_name
    from .data.prepare import PrepareConfig, check_prepared, prepare_dataset

    if args.dataset is None:
        if not args.check:
            raise ValueError("name a dataset (cub200, cars196, sop, inshop), or use --check DIR")
        report = check_prepared(args.check, workers=args.workers, progress=args.progress)
    else:
        root = args.root or DEFAULT_DATASET_ROOTS.get(canonical_dataset_name(args.dataset))
        if args.check:
            report = check_prepared(args.check, dataset=args.dataset, workers=args.workers, progress=args.progress)
        else:
            config = PrepareConfig(dataset=args.dataset, root=root, urls=args.urls, from_archives=args.from_archives,
                                   sha256=args.sha256, check=args.check is not None, cache=args.cache,
                                   cache_keep_aspect=args.cache_keep_aspect, cache_size=args.cache_size,
                                   workers=args.workers, retries=args.retries, timeout=args.timeout,
                                   keep_archives=args.keep_archives, progress=args.progress)
            report = prepare_dataset(config)
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    for error in report.get("errors", []):
        print(f"error: {error}", file=sys.stderr)
    counts = ", ".join(f"{split} {c['images']} images / {c['classes']} classes" for split, c in (report.get("counts") or {}).items())
    print(f"{report.get('dataset')}: {'OK' if report.get('ok') else 'FAILED'} ({counts})")
    print(f"--dataset_root {report.get('dataset_root')}")
    return 0 if report.get("ok") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normsoftmax", description="Image embeddings by classification (normalized softmax).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_demo(subparsers)
    _add_prepare(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (DatasetError, ValueError, FileNotFoundError, PrepareError, DownloadError, ExtractionError) as error:
        # Bad input is the user's to fix: one clear message, no stack trace.
        print(f"normsoftmax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normsoftmax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
