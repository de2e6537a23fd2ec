"""Command-line interface: ``robustkit demo | run | train | eval | repair | certify | filter | list``."""

from __future__ import annotations

import argparse
import inspect
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

DEMO_HELP = """\
Train a small CNN on scikit-learn's built-in digits (real 8x8 scans upsampled to 32x32;
no download), wrap it with the noise + bilateral preprocessing defense, attack both with
PGD (Linf and L2, and EOT-PGD for the randomized defense) and write report.json,
report.md and PNG plots to the output folder. Takes about a minute on 2 CPU cores, most of it in
the two EOT-PGD rows on the randomized defense; the first run after an install also compiles
the fused bilateral kernel (~20 s once, overlapped with training).
The run is driven by the bundled config configs/demo.yaml; `robustkit run` takes your own.
"""

RUN_HELP = """\
Run a pipeline config (YAML): a data set, a model and a list of steps (train, evaluate,
save_model, load_model, ...). The whole config is validated before anything runs; a bad
key is named with its path and the reason. Use --set to override values without editing
the file, e.g. --set steps.0.train.epochs=2 --set data.size=16.
"""

FILTER_HELP = """\
Score every sample of a (suspect) training set with a model trained on it, flag the likely
poisoned ones and write the kept samples to OUT/kept.npz with a report. The input data is never
modified. With a poisoned set saved by robustkit (which records the poisoned indices) the
report also gives TPR, FPR, precision, F1 and AUROC.
"""


def demo_config_path() -> Path:
    return Path(str(resources.files("robustkit") / "configs" / "demo.yaml"))


def _add_import_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a plug-in module (dotted name or .py file) first, so its registered names "
                        "can be used; repeatable (a config can also list them under 'imports:')")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_import_option(p)
    p.add_argument("--out", "-o", help="output folder (default: the config's output_dir, else runs/<name>)")
    p.add_argument("--device", help="override the config's device: auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (dotted path, YAML value); repeatable")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print it, run nothing")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="robustkit",
        description="Harden PyTorch image classifiers and clean up after backdoor attacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"robustkit {__version__}")
    parser.add_argument("--import", dest="imports_top", action="append", default=[], metavar="MODULE",
                        help="import a plug-in module (dotted name or .py file) that registers models, "
                             "preprocessors, attacks, triggers, filters or repairs; repeatable")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the built-in end-to-end demo on offline data", description=DEMO_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(demo)
    demo.add_argument("--quick", action="store_true", help="fewer epochs and test images (a smoke test, ~25 s)")
    def config_command(name: str, help: str, description: str, config_help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("config", help=config_help)
        _add_run_options(cmd)
        return cmd

    config_command("run", "run a pipeline config (YAML)", RUN_HELP, "path to a YAML config, e.g. configs/demo.yaml")
    config_command("train", "train a (possibly backdoored) victim from a config",
                   "Run a pipeline config that trains a model (e.g. poison -> train -> backdoor_eval -> save_model; "
                   "see configs/backdoor_badnets.yaml). Same options as run.",
                   "path to a YAML config with a train step")
    ev = config_command("eval", "evaluate a model from a config (clean, PGD, EOT-PGD, AutoAttack, eps sweeps)",
                        "Run a pipeline config with an evaluate step (e.g. load_model -> evaluate). "
                        "For several processes use `torchrun --nproc-per-node N -m robustkit.eval CONFIG`.",
                        "path to a YAML config with an evaluate step")
    ev.add_argument("--robustbench-model", metavar="NAME",
                    help="evaluate a RobustBench zoo model (e.g. Standard) instead of the config's model")
    ev.add_argument("--model-dir", default="models",
                    help="RobustBench model folder: <dir>/<dataset>/<threat model>/<NAME>.pt (read offline)")
    ev.add_argument("--threat-model", default="Linf", help="RobustBench threat model of the checkpoint (Linf, L2)")
    config_command("repair", "repair a backdoored model from a config (FT-SAM, fine-tuning, skip suppression)",
                   "Run a pipeline config with a repair step (e.g. poison -> train -> repair -> save_model, or "
                   "load_model -> repair; see configs/repair_ftsam.yaml). The report holds ACC, ASR, RA and DER before "
                   "and after, and repair.png plots ACC and ASR over the repair epochs. Same options as run.",
                   "path to a YAML config with a repair step")
    config_command("certify", "certify noise defenses with randomized smoothing (certified L2 accuracy vs radius)",
                   "Run a pipeline config with a certify step (Cohen et al. 2019: CERTIFY / PREDICT for a defense whose "
                   "first randomized part is Gaussian noise, e.g. noise_bilateral): certified L2 accuracy against the "
                   "radius beside EOT-PGD L2, abstention, and certified_accuracy.png; see configs/certify_digits.yaml. "
                   "Raise the draws with --set steps.1.certify.n=100000. Same options as run.",
                   "path to a YAML config with a certify step")
    flt = sub.add_parser("filter", help="flag poisoned samples of a data set and write the kept subset",
                         description=FILTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    flt.add_argument("--model", required=True, help="robustkit checkpoint of a model trained on the suspect data")
    flt.add_argument("--data", required=True,
                     help="the suspect data: a poisoned set saved by robustkit (.npz + manifest, or folder), or an .npz with x, y")
    flt.add_argument("--out", required=True, help="output folder: kept.npz, flagged.json, report.md/json, scores.png")
    flt.add_argument("--filter", default="attention_entropy",
                     help="attention_entropy (ViTs), activation_clustering or spectral_signatures (default: %(default)s)")
    flt.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a filter parameter (YAML value), e.g. --param separation=1.5; repeatable")
    flt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    flt.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_import_option(flt)
    lst = sub.add_parser("list", help="list registered components and their parameters",
                         description="List what can be named in a config: datasets, models, preprocessors, attacks, steps, ...")
    lst.add_argument("kind", nargs="*", help="registries to show (default all): " + ", ".join(_registry_names()))
    _add_import_option(lst)
    return parser


def _registry_names() -> list[str]:
    from .registry import REGISTRIES

    return list(REGISTRIES)


QUICK_OVERRIDES = ["steps.0.train.epochs=3", "steps.1.evaluate.n_samples=128"]


def _check_out_dir(out: str | Path | None, option: str = "--out") -> None:
    """An output folder must be a folder: refuse an existing file before anything runs."""
    from .errors import ConfigError

    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"{out} is an existing file, not a folder; choose another output folder", option)


def _mentions_bilateral(node: object) -> bool:
    if isinstance(node, dict):
        return any(_mentions_bilateral(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_mentions_bilateral(v) for v in node)
    return isinstance(node, str) and "bilateral" in node


def _warm_up_bilateral(cfg: dict) -> None:
    """A CPU pipeline with a bilateral preprocessor: compile the fused kernel on a background
    thread while data loads and the model trains (~20 s the first time after an install)."""
    device = str(cfg.get("device", "auto"))
    if device.startswith("cuda") or not _mentions_bilateral(cfg.get("steps", [])):
        return
    import torch

    if device == "auto" and torch.cuda.is_available():
        return
    from .preprocessing.kernels.bilateral_numba import warm_up

    warm_up(background=True)


def _run(config: str | Path, args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from .pipeline import apply_overrides, load_config, validate_config
    from .pipeline import run as run_pipeline

    overrides = list(extra) + list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = validate_config(apply_overrides(load_config(config), overrides))
    _check_out_dir(args.out or cfg.get("output_dir"))
    if args.dry_run:
        import yaml

        from .pipeline.preflight import preflight

        checked = preflight(cfg)
        print(f"config {config} is valid:\n")
        print(yaml.safe_dump(cfg, sort_keys=False))
        print("checked: " + "; ".join(checked))
        return 0
    _warm_up_bilateral(cfg)
    report = run_pipeline(cfg, out_dir=args.out, progress=not args.no_progress)
    for table in report.tables:
        if table.title != "Training" and not table.title.startswith("Repair history"):
            print()
            print(table.to_markdown())
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _load_suspect_data(path: str):
    """A robustkit poisoned set (with ground truth) or a plain ``.npz`` holding ``x`` and ``y``."""
    from .backdoor.poisoned import load_poisoned
    from .errors import DataNotFoundError, InputError

    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"data not found: {p}")
    if (p.is_dir() and (p / "manifest.json").is_file()) or p.with_name(p.name + ".manifest.json").is_file():
        return load_poisoned(p)
    if p.suffix != ".npz":
        raise InputError(f"{p}: expected a robustkit poisoned set (with its manifest) or an .npz file with x and y")
    from .data.npz import load_npz

    return load_npz(p).train  # x, y as given (or the training split of a split file)


def _filter(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    import yaml

    from .errors import ConfigError
    from .filtering.run import run_filter
    from .models.checkpoints import load_checkpoint
    from .registry import FILTERS
    from .utils import resolve_device

    spec: dict = {"name": args.filter}
    for item in args.param:
        if "=" not in item:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", "--param")
        key, value = item.split("=", 1)
        spec[key.strip()] = yaml.safe_load(value)
    if "progress" in FILTERS.parameters(args.filter) and args.no_progress:
        spec.setdefault("progress", False)
    filt = FILTERS.build(spec, "--filter")
    model = load_checkpoint(args.model, map_location=resolve_device(args.device))
    data = _load_suspect_data(args.data)
    result, metrics = run_filter(model, data, filt, args.out, name=args.filter, input_path=args.data)
    n, k = result.flagged.numel(), int(result.flagged.sum())
    print(f"{args.filter}: flagged {k} of {n} samples; kept {n - k} -> {Path(args.out) / 'kept.npz'}")
    if metrics:
        print("  " + "  ".join(f"{m.upper()} {metrics[m]:.3f}" for m in ("tpr", "fpr", "precision", "f1", "auroc")))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _list(kind: Sequence[str] | str | None) -> int:
    from .registry import REGISTRIES

    kinds = [kind] if isinstance(kind, str) else list(kind or REGISTRIES)
    unknown = [k for k in kinds if k not in REGISTRIES]
    if unknown:
        print(f"unknown kind(s) {', '.join(map(repr, unknown))}; choose from {', '.join(REGISTRIES)}", file=sys.stderr)
        return 2
    for k in kinds:
        reg = REGISTRIES[k]
        print(f"{k}:")
        for name in reg.names():
            params = []
            for pname, p in reg.parameters(name).items():
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                    continue
                params.append(pname if p.default is inspect.Parameter.empty else f"{pname}={p.default!r}")
            doc = (inspect.getdoc(reg.get(name)) or "").split("\n")[0]
            print(f"  {name}({', '.join(params)})")
            if doc:
                print(f"      {doc}")
        print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import RobustkitError

    try:
        from .pipeline import import_plugins

        import_plugins([*args.imports_top, *getattr(args, "imports", [])], "--import")
        if args.command == "demo":
            return _run(demo_config_path(), args, QUICK_OVERRIDES if args.quick else ())
        if args.command == "run":
            return _run(args.config, args)
        if args.command in ("train", "eval", "repair", "certify"):
            from .errors import ConfigError
            from .pipeline import load_config

            needed = {"train": "train", "eval": "evaluate", "repair": "repair", "certify": "certify"}[args.command]
            if getattr(args, "robustbench_model", None):
                args.overrides = [f"model={{name: robustbench, model_name: {args.robustbench_model}, "
                                  f"model_dir: '{args.model_dir}', threat_model: {args.threat_model}}}", *args.overrides]
            if not any(needed in step for step in load_config(args.config)["steps"]):
                raise ConfigError(f"has no '{needed}' step; use `robustkit run` for other pipelines", "steps")
            return _run(args.config, args)
        if args.command == "filter":
            return _filter(args)
        if args.command == "list":
            return _list(args.kind)
    except RobustkitError as exc:
        print(f"robustkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustkit: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
