"""Command line: each command's parser is derived from its config dataclass; the flags a user gives become
that config (:func:`normsoftmax.config.build_config`) and go to one Python API call. Nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .config import (
    CalibrateConfig,
    DemoConfig,
    DuplicatesConfig,
    EmbedConfig,
    EvaluateConfig,
    ExportConfig,
    IndexAddConfig,
    IndexBuildConfig,
    IndexCompactConfig,
    IndexRemoveConfig,
    PrepareConfig,
    ReportConfig,
    SearchConfig,
    ServeConfig,
    TrainConfig,
    build_config,
    field_choices,
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"K values must be positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _argument(config_field: dataclasses.Field, hint) -> tuple[list[str], dict]:
    """argparse's names and keywords for one config field."""
    meta = config_field.metadata
    name = config_field.name
    kinds = set(typing.get_args(hint)) - {type(None)} or {hint}
    kwargs: dict = {"help": meta.get("help") or None, "default": None}
    if meta.get("positional"):
        names = [name]
        kwargs.pop("default") if meta.get("nargs") is None else None
    else:
        names = list(meta.get("flags") or [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else []))
        kwargs["dest"] = name
    if "type" in meta:
        kwargs["type"] = meta["type"]
    elif bool in kinds and "action" not in meta:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif any(typing.get_origin(kind) is list for kind in kinds):
        element = typing.get_args(next(kind for kind in kinds if typing.get_origin(kind) is list))[0]
        if element is int:
            kwargs["type"] = _int_list
        elif element is float:
            kwargs["type"] = _float_list
    else:
        kwargs["type"] = next(iter(kinds))
    for key in ("nargs", "const", "action", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    choices = field_choices(config_field)
    if choices:
        kwargs["choices"] = choices
    if kwargs.get("action") == "store_true":
        kwargs.pop("type", None)
    return names, kwargs


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of ``cls`` that the command line should set."""
    hints = typing.get_type_hints(cls)
    for config_field in dataclasses.fields(cls):
        if config_field.metadata.get("cli", True) is False:
            continue
        names, kwargs = _argument(config_field, hints[config_field.name])
        parser.add_argument(*names, **kwargs)


def explicit_values(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` the user actually gave (argparse leaves the others at None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in vars(args).items() if key in names and value is not None}


# ------------------------------------------------------------------------------------------------ commands
def _train(config: TrainConfig) -> int:
    from .training import train_embedder

    summary = train_embedder(config)
    if summary["is_main"]:
        print(f"run directory: {summary['run_dir']}")
    return 0


def _evaluate(config: EvaluateConfig) -> int:
    from .evaluation import evaluate_checkpoint, recall_report

    result = evaluate_checkpoint(config)
    print(json.dumps(result, indent=2) if config.print_json else "\n".join(recall_report(result)))
    return 0


def _demo(config: DemoConfig) -> int:
    from .demo import run_demo

    run_demo(config)
    return 0


def _prepare(config: PrepareConfig) -> int:
    from .prepare import prepare_dataset

    report = prepare_dataset(config)
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    for error in report.get("errors", []):
        print(f"error: {error}", file=sys.stderr)
    counts = ", ".join(f"{split} {c['images']} images / {c['classes']} classes"
                       for split, c in (report.get("counts") or {}).items())
    print(f"{report.get('dataset')}: {'OK' if report.get('ok') else 'FAILED'} ({counts})")
    print(f"--dataset_root {report.get('dataset_root')}")
    return 0 if report.get("ok") else 1


def _calibrate(config: CalibrateConfig) -> int:
    from .calibration import calibrate_checkpoint

    document = calibrate_checkpoint(config)
    print(f"{document['images']} images of {document['classes']} classes; thresholds chosen on "
          f"{document['split']['fit']['classes']} classes, measured on the other "
          f"{document['split']['held_out']['classes']}:")
    for kind, calibrated in document["kinds"].items():
        for decision in calibrated["decisions"]:
            if not decision["reachable"]:
                print(f"  {kind:6s} {decision['target']:18s} not reachable on the fit half")
                continue
            held = decision["held_out"]
            at = (f"Hamming <= {decision['hamming']}" if "hamming" in decision
                  else f"cosine >= {decision['threshold']:.4f}")
            print(f"  {kind:6s} {decision['target']:18s} {at:20s} held out: precision {held['precision']:.4f}, "
                  f"recall {held['recall']:.4f}, FMR {held['fmr']:.2e}, FNMR {held['fnmr']:.4f}")
    print(f"calibration: {document['path']}")
    return 0


def _embed(config: EmbedConfig) -> int:
    from .embedding import embed_files

    summary = embed_files(config)
    if summary.get("is_main", True):
        print(f"{summary['count']} embeddings ({summary['dim']} dims) in {summary['out']}")
    return 0


def _index_build(config: IndexBuildConfig) -> int:
    from .search import build_index

    info = build_index(config)
    print(f"index {info['path']}: {info['count']} items, {', '.join(info['kinds'])}"
          + (f" (nlist {info['nlist']}, nprobe {info['nprobe']})" if info.get("nlist") else ""))
    return 0


def _index_add(config: IndexAddConfig) -> int:
    from .search import add_to_index

    info = add_to_index(config)
    print(f"index {info['path']}: {info['count']} items")
    return 0


def _index_remove(config: IndexRemoveConfig) -> int:
    from .search import remove_from_index

    info = remove_from_index(config)
    print(f"index {info['path']}: removed {len(info['removed'])}; {info['count']} items")
    return 0


def _index_compact(config: IndexCompactConfig) -> int:
    from .search import compact_index

    info = compact_index(config)
    print(f"index {info['path']}: {info['count']} items in one generation")
    return 0


def _duplicates(config: DuplicatesConfig) -> int:
    from .search import find_duplicates, open_index, write_duplicates

    if not config.index:
        raise ValueError("duplicates needs the index")
    index = open_index(config.index)
    found = find_duplicates(index, config.threshold, config.kind, config.calibrated, config.nprobe, config.method)
    out = Path(config.out) if config.out else Path(str(index.location)) / "duplicates.json"
    if not config.out and str(index.location).startswith("milvus"):
        out = Path("duplicates.json")
    written = write_duplicates(found, index, out, config.html_groups)
    rule = (f"Hamming <= {found.hamming}" if found.kind == "binary" else f"cosine >= {found.threshold:.4f}")
    if not written["groups"]:
        print(f"no duplicates among {len(found.ids)} items at {rule} ({found.method}, {found.seconds:.1f} s)")
    else:
        print(f"{written['groups']} groups of duplicates ({written['items_in_groups']} items, {written['pairs']} pairs "
              f"at {rule}) among {len(found.ids)} items ({found.method}, {found.seconds:.1f} s)")
    print(f"groups: {written['json']}  {written['csv']}  {written['html']}")
    return 0


def _index_search(config: SearchConfig) -> int:
    from .search import search_images

    results = search_images(config)
    if config.print_json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["query"])
        if "threshold" in result:
            print(f"  (match: score >= {result['threshold']:.4f}, from {result['threshold_source']})")
        for rank, hit in enumerate(result["neighbours"], start=1):
            distance = f"  Hamming {hit['hamming']:4d}" if hit.get("hamming") is not None else ""
            decision = ("  match" if hit["match"] else "  -    ") if "match" in hit else ""
            print(f"  {rank:3d}  {hit['score']:.4f}{distance}{decision}  {hit['path']}")
    return 0


def _serve(config: ServeConfig) -> int:
    from .search import serve_index

    serve_index(config)
    return 0


def _report(config: ReportConfig) -> int:
    from .report import write_report

    print(f"report: {write_report(config)}")
    return 0


def _export(config: ExportConfig) -> int:
    from .export import export_embedder

    result = export_embedder(config)
    print(f"{config.format} model: {result['path']} (max absolute difference from PyTorch on "
          f"{result['checked_images']} images: {result['max_abs_diff']:.2e})")
    return 0


# name: (config class, runner, help, description); a dict is a command with sub-commands
Command = tuple[type, typing.Callable[[typing.Any], int], str, "str | None"]
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "train": (TrainConfig, _train, "train an embedder (the reference script's flags)",
              "Train with normalized softmax. Flags given explicitly override --recipe."),
    "evaluate": (EvaluateConfig, _evaluate, "Recall@K, MAP@R, R-precision, NMI from a checkpoint or saved embeddings",
                 None),
    "demo": (DemoConfig, _demo, "train on generated glyph images and compare with raw pixels and an untrained net",
             None),
    "prepare": (PrepareConfig, _prepare,
                "download, verify, extract and check a benchmark dataset (safe to re-run and to interrupt)",
                "Prepare a benchmark under --root, or re-verify a prepared copy with --check DIR."),
    "calibrate": (CalibrateConfig, _calibrate, "match thresholds with known error rates (held out on unseen classes)",
                  None),
    "embed": (EmbedConfig, _embed, "embed a folder, a CSV or a dataset split into an embeddings file", None),
    "index": {
        "build": (IndexBuildConfig, _index_build,
                  "build an index (a faiss folder or a Milvus collection) from an embeddings file", None),
        "add": (IndexAddConfig, _index_add, "append an embeddings file to an index", None),
        "search": (SearchConfig, _index_search, "embed images and print their nearest neighbours in an index", None),
        "remove": (IndexRemoveConfig, _index_remove, "remove items by id (a service using the index sees it at once)",
                   None),
        "compact": (IndexCompactConfig, _index_compact, "fold an index folder's journal into a new generation", None),
    },
    "duplicates": (DuplicatesConfig, _duplicates,
                   "group the items of an index that score past a threshold (JSON, CSV, HTML page)", None),
    "serve": (ServeConfig, _serve, "serve an index: a JSON search API and a search page", None),
    "report": (ReportConfig, _report, "write a self-contained HTML report of a training run", None),
    "export": (ExportConfig, _export, "export the embedder to ONNX or TorchScript, checked against PyTorch", None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normsoftmax",
                                     description="Image embeddings by classification (normalized softmax).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            group = subparsers.add_parser(name, help=f"{name}: {', '.join(entry)}")
            nested = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            for sub, (cls, _, help_text, description) in entry.items():
                add_config_arguments(nested.add_parser(sub, help=help_text, description=description or help_text), cls)
        else:
            cls, _, help_text, description = entry
            add_config_arguments(subparsers.add_parser(name, help=help_text, description=description or help_text), cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.records import DatasetError
    from .files import NotEnoughSpaceError
    from .prepare import DownloadError, ExtractionError, PrepareError
    from .training.recipe import Preempted

    parser = build_parser()
    args = parser.parse_args(argv)
    found = COMMANDS.get(args.command or "")
    entry = found.get(getattr(args, "subcommand", None) or "") if isinstance(found, dict) else found
    if entry is None:
        parser.print_help()
        return 2
    cls, runner, _, _ = entry
    try:
        return runner(build_config(cls, explicit_values(args, cls)))
    except Preempted as stopped:
        print(f"normsoftmax {args.command}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (DatasetError, ValueError, FileNotFoundError, PrepareError, DownloadError, ExtractionError,
            NotEnoughSpaceError, FloatingPointError) as error:
        # Bad input is the user's to fix: one clear message, no stack trace.
        print(f"normsoftmax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normsoftmax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
