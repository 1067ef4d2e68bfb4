"""The ``semisam`` command: thin parsers over typed functions.

    semisam run CONFIG [key.sub=value ...]   run or resume a run (starts a local Ray unless one is reachable)
    semisam inspect STORE [--png DIR]        per-round table of a pseudo-label store (+ overlay pictures)
    semisam eval RUN                         per-round validation and test metrics of a run folder
    semisam predict RUN INPUT... OUTPUT      segment scans with a run's specialist, one NIfTI label each
    semisam verify RUN                       check a run folder and list every problem
    semisam demo-data OUT                    write the synthetic MSD dataset and a tiny random SAM checkpoint
    semisam validate ROOT                    check a dataset folder (MSD, h5, SSL4MIS; detected) and list every problem
    semisam config                           every config key: type, default, meaning (docs/config.md is its output)
    semisam config --resolved CONFIG [k=v]   the config a run would use (base: and overrides applied), as YAML
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pipeline.errors import ConfigError, Interrupted, SemisamError
from pipeline.interrupt import StopFlag, exit_code

log = logging.getLogger("semisam")


def _out(text: str) -> None:
    """Results for the user go to stdout (logs go to stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    """The stop flag goes in first, before the heavy imports (torch, Ray, segment_anything), preflight, Ray's
    start-up and placement, and stays until the process exits: a Ctrl-C or SIGTERM at any moment ends in
    one line and exit 130/143, with the actors and a self-started Ray shut down (``Coordinator.shutdown``)."""
    stop = StopFlag().__enter__()  # kept installed until exit: the interpreter restores nothing we need
    cfg = None
    try:
        from pipeline.config import load_config
        from pipeline.oracle import BANNER, check_unlocked, is_oracle

        cfg = load_config(args.config, args.overrides)
        check_unlocked(cfg, args.leak_labels)  # before anything starts (the coordinator checks again)
        stop.check()
        from pipeline.reports import rounds_table
        from semisam.launch import run

        stop.check()
        summaries = run(cfg, stop=stop, leak_labels=args.leak_labels)
        stop.check()  # a signal during the shutdown of a finished run: the run is whole, but say so
    except Interrupted as e:
        log.warning("%s (run folder %s)", e, cfg.run_dir if cfg is not None else "not opened yet")
        return exit_code(e.signum)
    except KeyboardInterrupt:  # a second signal while stopping: at once
        signum = stop.signum or signal.SIGINT
        log.warning("%s", Interrupted(signum).args[0].replace("interrupted by", "stopped at once by a second"))
        return exit_code(signum)
    if is_oracle(cfg):
        _out(BANNER)
    _out(f"run folder: {cfg.run_dir}")
    _out(rounds_table(summaries))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify_run

    report = verify_run(args.run)
    _out(report.text())
    return 0 if report.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.reports import inspect_table, write_overlays

    _out(inspect_table(args.store))
    if args.png:
        paths = write_overlays(args.store, Path(args.png), num_slices=args.num_slices, round_index=args.round,
                               pick=args.pick, seed=args.seed)
        sheets = [p for p in paths if p.parent.name == "sheets"]
        _out(f"wrote {len(paths) - len(sheets)} slice pictures ({args.pick}) to {args.png}"
             + "".join(f"\nsummary sheet: {p}" for p in sheets))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.oracle import banner
    from pipeline.reports import eval_table
    from pipeline.run_folder import RunFolder

    mark = banner(RunFolder(args.run))
    if mark:  # an oracle run (prompts from labels) is never shown without saying so
        _out(mark)
    _out(eval_table(args.run))
    if args.png:
        from pipeline.eval_plots import write_eval_plots

        plot = write_eval_plots(args.run, Path(args.png))  # a path or a URL: never through Path (s3:// -> s3:/)
        _out(f"wrote {plot.path} ({', '.join(plot.panels)})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import IN_PROCESS_MAX, PredictOptions, summary_text
    from semisam.launch import predict

    in_process_max = IN_PROCESS_MAX if args.in_process_max is None else args.in_process_max
    options = PredictOptions(round=args.round, labels=Path(args.labels) if args.labels else None,
                             in_process_max=in_process_max, with_generalist=args.with_generalist)
    try:
        summary = predict(args.run, [Path(p) for p in args.inputs], Path(args.output), options)
    except Interrupted as e:
        log.warning("%s (finished label files in %s are kept and skipped by a rerun)", e, args.output)
        return exit_code(e.signum)
    _out(summary_text(summary))
    return 1 if summary["failed"] else 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.data.synthetic import write_synthetic_msd
    from pipeline.generalist.sam import save_tiny_sam

    out = Path(args.out)
    write_synthetic_msd(out, num_cases=args.cases, seed=args.seed, style=args.style)
    save_tiny_sam(out / "tiny_sam.pt", seed=args.seed)
    _out(f"wrote {args.cases} synthetic cases ({args.style} style) and tiny_sam.pt to {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.resolved:  # what a run would use: the file, its base(s) and the overrides, validated
        from pipeline.config import dump_config, load_config

        sys.stdout.write(dump_config(load_config(args.resolved, args.overrides)))
        return 0
    if args.overrides:
        raise ConfigError(f"overrides ({' '.join(args.overrides)}) go with --resolved CONFIG")
    from pipeline.config_reference import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.data.validate import validate_dataset

    info = validate_dataset(Path(args.root), args.format)
    labeled = sum(c.label is not None for c in info.cases.values())
    _out(f"{args.root}: {info.layout}")
    if info.split_lists:
        _out("lists: " + ", ".join(f"{name}.list {len(ids)} cases" for name, ids in info.split_lists.items()))
    _out(f"{args.root}: {len(info.cases)} cases ({labeled} labeled), labels {info.labels}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semisam", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume a run")
    r.add_argument("config", help="YAML config, e.g. conf/demo.yaml")
    r.add_argument("overrides", nargs="*", help="dotted overrides such as train.iterations=200")
    r.add_argument("--i-know-this-leaks-labels", dest="leak_labels", action="store_true",
                   help="allow prompts.source: oracle_labels_LEAK (prompts from the unlabeled cases' labels: a "
                   "ceiling for benchmarks, never a result); the run is marked as an oracle run everywhere")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="summarise a pseudo-label store")
    i.add_argument("store", help="the store folder, e.g. runs/demo/pseudo_labels")
    i.add_argument("--png", metavar="DIR", help="also write overlay pictures of a few slices here")
    i.add_argument("--round", type=int, default=None, help="round for the pictures (default: the last)")
    i.add_argument("--num-slices", type=int, default=6)
    i.add_argument("--pick", choices=["disagreement", "lowest-score", "random", "most-foreground"],
                   default="disagreement", help="which prompted slices to draw (default: lowest pseudo-label / "
                   "specialist agreement)")
    i.add_argument("--seed", type=int, default=0, help="for --pick random")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="per-round validation and test metrics of a run folder, the best round marked")
    e.add_argument("run", help="the run folder, e.g. runs/demo")
    e.add_argument("--png", metavar="DIR", help="also plot Dice per round (and the pseudo-label audit) here")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="segment scans (NIfTI, h5) with a run's specialist, one NIfTI label file each")
    pr.add_argument("run", help="the run folder, e.g. runs/demo")
    pr.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="scan files or folders of them (.nii.gz/.nii, nnU-Net _0000 names, .h5 with 'image')")
    pr.add_argument("output", metavar="OUTPUT", help="folder for <case>.nii.gz (finished files are skipped on a rerun)")
    pr.add_argument("--round", default="best", help="best (by validation Dice; the last without a validation "
                    "split), last, or a round number (default: best)")
    pr.add_argument("--labels", metavar="DIR", help="reference labels <case>.nii.gz/.nii/.h5: also write "
                    "OUTPUT/metrics.csv (Dice, HD95 per case and class) and OUTPUT/summary.json")
    pr.add_argument("--in-process-max", type=int, default=None, metavar="N",
                    help="up to N scans are segmented in this process, more on Ray actors with the run's "
                    "workers.sam resources (default: pipeline.predict.IN_PROCESS_MAX, 8)")
    pr.add_argument("--with-generalist", action="store_true", help="segment as relabeling does: the "
                    "specialist's prompts through the run's generalist, each class from the run's class source")
    pr.set_defaults(func=cmd_predict)

    f = sub.add_parser("verify", help="check a run folder (checkpoints, manifest vs arrays, state) and list every problem")
    f.add_argument("run", help="the run folder: a path or URL, e.g. runs/demo or s3://bucket/runs/demo")
    f.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo-data", help="write the synthetic dataset and a tiny SAM checkpoint")
    d.add_argument("out", nargs="?", default="data/demo")
    d.add_argument("--cases", type=int, default=12)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--style", choices=["edges", "hippocampus"], default="edges",
                   help="edges: parts with clear intensity edges, which the weight-free generalist can follow "
                   "(the demo); hippocampus: low-contrast parts, as the test fixtures")
    d.set_defaults(func=cmd_demo_data)

    c = sub.add_parser("config", help="print every config key with its type, default and meaning (Markdown), "
                       "or with --resolved the config a run would use")
    c.add_argument("--resolved", metavar="CONFIG", help="print the resolved config of this file (its base: "
                   "and the overrides applied, validated) as YAML, as the run folder's config.yaml would hold it")
    c.add_argument("overrides", nargs="*", help="dotted overrides, with --resolved")
    c.set_defaults(func=cmd_config)

    v = sub.add_parser("validate", help="check a dataset folder")
    v.add_argument("root")
    v.add_argument("--format", choices=["auto", "msd", "h5", "ssl4mis"], default="auto",
                   help="dataset layout (default: detect it and say what was found)")
    v.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SemisamError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
