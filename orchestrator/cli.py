"""The `sau` command line: run a grid, attack one model, import one from BackdoorBench, purify one, report,
sync tracking."""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import asdict, fields
from pathlib import Path

import torch

import backdoor
from backdoor import (TrainRecipe, check_clean_subset, check_fits, clean_subset, der, eval_sets, evaluate,
                      load_dataset, load_record, make_attack, save_record, to_unit, train_record)
from backdoor.backdoorbench import import_backdoorbench
from backdoor.record import ModelRecord
from defenses import DEFENSES
from sau_kernel import MAX_SEED

from .errors import USER_ERRORS
from .results import format_table, read_results
from .storage import Storage


class CommandError(ValueError):
    """A command that cannot go on because of what it was given; one line for the user."""


def parse_params(pairs: list[str], option: str = "--param") -> dict[str, object]:
    """KEY=VALUE pairs; values become int, float or bool where they read as one."""
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"{option} {pair!r}: expected KEY=VALUE")
        params[key] = parse_scalar(text)
    return params


def parse_scalar(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def defense_config(defense: str, params: dict[str, object]):
    params_type = DEFENSES[defense].params_type
    known = {f.name for f in fields(params_type)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CommandError(f"--param {unknown[0]}: not a parameter of {defense} "
                           f"({params_type.__name__} fields: {', '.join(sorted(known)) or 'none'})")
    try:
        return params_type(**params)
    except ValueError as error:
        raise CommandError(f"--param {error}") from None


def device_of(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def emit(summary: dict[str, object], text_lines: list[str], as_json: bool) -> None:
    print("\n".join(text_lines))
    if as_json:
        print(json.dumps(summary))


def ensure_new_dir(path: Path, option: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CommandError(f"{option} {path}: already exists and is not empty")


def cmd_run(args: argparse.Namespace) -> None:
    from .spec import CONFIRM_TRIALS, load_grid

    grid = load_grid(args.grid)  # a bad spec fails before ray, mlflow and optuna load
    if grid.trial_count > CONFIRM_TRIALS and not args.yes:
        raise CommandError(f"{args.grid}: the grid expands to {grid.trial_count:,} trials, more than "
                           f"{CONFIRM_TRIALS:,}; pass --yes to run them all")

    from .cluster import ClusterError
    from .store import StoreError
    from .sweep import SweepError, run_sweep

    storage = Storage(args.storage or grid.storage)
    try:
        run_sweep(grid, storage=storage, resume=args.resume, address=args.address,
                  tracking_uri=args.tracking_uri)
    except (ClusterError, StoreError, SweepError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:  # the storage cannot be reached or written (object-store errors are OSErrors)
        raise CommandError(f"storage {storage}: {str(error).splitlines()[0]}") from None


def cmd_attack(args: argparse.Namespace) -> None:
    out = Path(args.out)
    ensure_new_dir(out, "--out")
    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed: must be in [0, {MAX_SEED}], got {args.seed}")
    given = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "augment": args.augment}
    recipe = TrainRecipe(**{k: v for k, v in given.items() if v is not None})
    data = load_dataset(args.dataset, root=args.data_root, download=args.download)
    attack = make_attack(args.attack, parse_params(args.param), data.shape, data.num_classes)
    check_fits(args.arch, data.shape, data.num_classes)  # fail before training, not in its first step
    metrics = train_record(data, attack, args.arch, recipe, args.seed, out, device=device_of(args.device),
                           on_epoch=lambda epoch, loss: print(f"epoch {epoch}: loss {loss:.4f}", file=sys.stderr))
    emit(asdict(metrics), [f"model record: {out}",
                           f"ACC {pct(metrics.acc)}  ASR {pct(metrics.asr)}  RA {pct(metrics.ra)}"], args.json)


def cmd_import_backdoorbench(args: argparse.Namespace) -> None:
    out = Path(args.out)
    ensure_new_dir(out, "--out")
    record = import_backdoorbench(Path(args.record_dir), out, data_root=args.data_root, device=device_of(args.device))
    figures = "  ".join(f"{name.upper()} {pct(value)}" for name, value in record.metrics.items())
    lines = [f"model record: {out}", figures]
    if "acc" not in record.metrics:
        lines.append("(no ACC: --data-root gives the clean test set)")
    emit(record.metrics, lines, args.json)


def cmd_purify(args: argparse.Namespace) -> None:
    cfg = defense_config(args.defense, parse_params(args.param))
    if not 0 < args.clean_ratio <= 1:
        raise CommandError(f"--clean-ratio: must be in (0, 1] (got {args.clean_ratio})")
    out = Path(args.out) if args.out else None
    if out is not None:
        ensure_new_dir(out, "--out")
    model, attack, record = load_record(Path(args.model_dir))
    data = load_dataset(args.dataset or record.dataset, root=args.data_root, download=args.download)
    if args.dataset is not None and not same_dataset(data.name, record.dataset):
        raise CommandError(f"--dataset {args.dataset}: the model record was trained on {record.dataset}")
    if data.shape != tuple(record.shape) or data.num_classes != record.num_classes:
        raise CommandError(f"--dataset {data.name}: images {data.shape} with {data.num_classes} classes do not "
                         f"match the model record ({tuple(record.shape)}, {record.num_classes} classes)")
    try:
        check_clean_subset(len(data.x_train), args.clean_ratio, data.num_classes)
    except ValueError as error:
        raise CommandError(f"--clean-ratio: {str(error).partition(': ')[2]}") from None
    device = device_of(args.device)
    sets = eval_sets(data, attack)
    before = evaluate(model.to(device), sets, device=device)
    index = clean_subset(len(data.x_train), args.clean_ratio, getattr(cfg, "seed", 0))
    start = time.perf_counter()
    result = DEFENSES[args.defense].purify(
        model, to_unit(data.x_train[index]), data.y_train[index], cfg, device=device,
        on_round=lambda p: print(f"round {p.log.round}: loss {p.log.loss:.4f} (clean {p.log.clean:.4f}, "
                                 f"sar {p.log.sar:.4f})", file=sys.stderr))
    seconds = time.perf_counter() - start
    after = evaluate(result.model, sets, device=device)
    summary = {**{f"{k}_before": v for k, v in asdict(before).items()},
               **{f"{k}_after": v for k, v in asdict(after).items()},
               "der": der(before, after), "seconds": seconds}
    if out is not None:
        save_record(out, result.model.cpu(), attack,
                    ModelRecord(**{**asdict(record), "metrics": asdict(after)}))
    emit(summary, [f"defense: {args.defense}  clean images: {len(index)}  rounds: {len(result.history)}  "
                   f"time: {seconds:.1f} s",
                   f"ACC {pct(before.acc)} -> {pct(after.acc)}",
                   f"ASR {pct(before.asr)} -> {pct(after.asr)}",
                   f"RA  {pct(before.ra)} -> {pct(after.ra)}",
                   f"DER {summary['der']:.4f}"] + ([f"purified model record: {out}"] if out else []), args.json)


def same_dataset(a: str, b: str) -> bool:
    """Names of one data set; an npz: path is compared as the file it names, however it was written."""
    if a.startswith("npz:") and b.startswith("npz:"):
        return Path(a[4:]).expanduser().resolve() == Path(b[4:]).expanduser().resolve()
    return a == b


def _rows(args: argparse.Namespace):
    """The rows of args.path that --status and --where select; warns when they come from several code versions."""
    from .tables import code_versions, select

    df = read_results(args.path)
    versions = code_versions(df)
    if len(versions) > 1:
        print(f"warning: {args.path} holds rows of code versions {', '.join(versions)}; they are shown apart and "
              "never averaged together", file=sys.stderr)
    return select(df, parse_params(args.where, "--where"), args.status)


def cmd_report(args: argparse.Namespace) -> None:
    from .tables import paper_table, render

    df = _rows(args)
    if args.table == "paper":
        group_by = args.group_by.split(",") if args.group_by is not None else None
        print(render(paper_table(df, group_by), args.format), end="")
    elif args.format == "latex" or args.group_by is not None:
        raise CommandError("--format latex and --group-by go with --table paper")
    elif df.empty:
        raise CommandError(f"{args.path}: no rows with status {args.status} and --where {' '.join(args.where)}")
    else:
        print(format_table(df, args.format))


def cmd_plot(args: argparse.Namespace) -> None:
    from . import plots

    df, out, paths = _rows(args), Storage(args.out), []
    if df.empty:
        raise CommandError(f"{args.path}: no rows with status {args.status} and --where {' '.join(args.where)}")
    if args.x:
        paths += plots.against(df, args.x, args.y.split(","), out)
    if args.pareto:
        objectives = [tuple(o.partition(":")[::2]) for o in args.pareto.split(",")]
        paths += plots.pareto(df, objectives, out)
    if args.trials:
        chosen = df[df["trial_id"].str.startswith(tuple(args.trials.split(",")))]
        if chosen.empty:
            raise CommandError(f"--trials {args.trials}: no such trial among the selected rows")
        info = Storage(args.path).read("sweep.json")
        uri = args.tracking_uri or (json.loads(info)["tracking_uri"] if info is not None else None)
        if uri is None:
            raise CommandError(f"--trials: {Storage(args.path).location('sweep.json')} is absent; "
                               "give --tracking-uri")
        paths += plots.rounds(uri, chosen, out)
    if not paths:
        raise CommandError("nothing to plot: give --x, --pareto or --trials")
    print("\n".join(paths))


def cmd_sync(args: argparse.Namespace) -> None:
    from .sync import SyncError, sync

    storage = Storage(args.storage)
    try:
        sync(storage, args.tracking_uri)
    except SyncError as error:
        raise CommandError(str(error)) from None
    except OSError as error:  # the storage cannot be reached (object-store errors are OSErrors)
        raise CommandError(f"storage {storage}: {str(error).splitlines()[0]}") from None


def one_line(text: str) -> str:
    """`text` with every character that would break the line (newlines, \\r, \\x85, ...) escaped: errors
    quote names and values the user typed."""
    return "".join(repr(c)[1:-1] if len(f"{c}.".splitlines()) > 1 else c for c in text)


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {one_line(message)} (--help shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sau", description="Shared Adversarial Unlearning sweeps.")
    debug = "on an unexpected error, print its traceback"
    parser.add_argument("--debug", action="store_true", help=debug)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        command = commands.add_parser(name, **kwargs)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
        return command

    run = add_command("run", help="run a grid spec (YAML) on Ray Tune")
    run.add_argument("grid", help="grid spec (YAML)")
    run.add_argument("--storage", help="results, models and checkpoints: a directory or an s3:// or gs:// URI "
                                       "(default: the grid's `storage`)")
    run.add_argument("--resume", action="store_true", help="continue a killed or failed sweep in --storage")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the storage directory)")
    run.add_argument("--yes", action="store_true", help="run a grid of more than 1,000 trials")
    run.set_defaults(func=cmd_run)

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-root", help="directory holding the data set (all but digits and npz:PATH)")
        p.add_argument("--download", action="store_true", help="allow torchvision to download the data set")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
        p.add_argument("--json", action="store_true", help="print the figures as one JSON object last")

    attack = add_command("attack", help="train one backdoored model into a model record")
    attack.add_argument("--dataset", required=True, help=f"one of {', '.join(backdoor.DATASETS)} or npz:PATH")
    attack.add_argument("--attack", required=True, help=f"one of {', '.join(backdoor.ATTACKS)}")
    attack.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="attack parameter")
    attack.add_argument("--arch", required=True, help=f"one of {', '.join(backdoor.ARCHS)}")
    attack.add_argument("--epochs", type=int, help="training epochs (default 100)")
    attack.add_argument("--lr", type=float, help="SGD learning rate, cosine-annealed (default 0.01)")
    attack.add_argument("--batch-size", type=int, help="default 128")
    attack.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                        help="train without random crops and flips")
    attack.add_argument("--seed", type=int, default=0, help="seeds poisoning, initialisation and shuffling")
    attack.add_argument("--out", required=True, help="model record directory to create")
    data_options(attack)
    attack.set_defaults(func=cmd_attack)

    imp = add_command("import-backdoorbench", help="turn a BackdoorBench attack result into a model record")
    imp.add_argument("record_dir", help="BackdoorBench record folder (attack_result.pt and bd_test_dataset/)")
    imp.add_argument("--data-root", help="directory of the clean data set: checks the record against it, adds ACC")
    imp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    imp.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    imp.add_argument("--out", required=True, help="model record directory to create")
    imp.set_defaults(func=cmd_import_backdoorbench)

    pur = add_command("purify", help="purify one model record with a defense (default SAU)")
    pur.add_argument("model_dir", help="model record directory")
    pur.add_argument("--dataset", help="data set (default: the one the model was trained on)")
    pur.add_argument("--clean-ratio", type=float, default=0.05, help="share of the training split used (default 0.05)")
    pur.add_argument("--defense", choices=list(DEFENSES), default="sau", help="the defense (default sau)")
    pur.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of the defense (sau: SAUConfig fields; ft: lr, rounds, batch_size, train_bn)")
    pur.add_argument("--out", help="write the purified model as a model record here")
    data_options(pur)
    pur.set_defaults(func=cmd_purify)

    def row_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", help="storage (directory or URI), results directory or Parquet file")
        p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                       help="only rows with this value (rows without the column are kept), e.g. clean_ratio=0.05")
        p.add_argument("--status", choices=("finished", "stopped", "diverged", "all"), default="finished",
                       help="rows of trials that ran to the end (default), that a scheduler stopped, whose losses "
                            "stopped being finite, or all")

    report = add_command("report", help="print the results of a sweep as a table")
    row_options(report)
    report.add_argument("--table", choices=("trials", "paper"), default="trials",
                        help="a row per trial (default), or the paper's: a row per data set, architecture, attack")
    report.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="latex: --table paper only")
    report.add_argument("--group-by", metavar="COLUMN[,COLUMN]",
                        help="--table paper: columns that split rows (default: every axis that varies)")
    report.set_defaults(func=cmd_report)

    plot = add_command("plot", help="draw a sweep's figures as PNG and SVG")
    row_options(plot)
    plot.add_argument("--x", help="ACC/ASR against this setting: eps, clean_ratio, any defense parameter")
    plot.add_argument("--y", default="asr_after,acc_after", help="metrics of --x (default asr_after,acc_after)")
    plot.add_argument("--pareto", metavar="METRIC:MODE,METRIC:MODE",
                      help="the Pareto front of two objectives, e.g. acc_after:max,asr_after:min")
    plot.add_argument("--trials", metavar="ID[,ID]", help="per-round curves of these trials (id prefixes)")
    plot.add_argument("--tracking-uri", help="MLflow store of --trials (default: the storage's sweep.json)")
    plot.add_argument("--out", required=True, help="where the figures go: a directory or an s3:// or gs:// URI")
    plot.set_defaults(func=cmd_plot)

    syn = add_command("sync", help="create the MLflow runs a sweep could not (its tracking server was down)")
    syn.add_argument("storage", help="the sweep's storage (directory or URI)")
    syn.add_argument("--tracking-uri", required=True, help="MLflow tracking URI to create the missing runs in")
    syn.set_defaults(func=cmd_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, *USER_ERRORS) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment problem: one line; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        reason = str(error).strip().splitlines()
        print(f"error: {type(error).__name__}" + (f": {one_line(reason[0])}" if reason else "")
              + ("" if args.debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 1
    return 0


def console() -> None:
    """The `sau` command: main(), then exit."""
    code = main()
    # The interpreter's exit collects every object torch, Ray and MLflow made, for seconds after a sweep;
    # frozen objects are left to the exit itself.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
