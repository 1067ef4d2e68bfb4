"""Which prompts suit a generalist: box only, box + points, and the prompt ensemble, with a real specialist.

    .venv/bin/python -m benchmarks.prompt_modes RUN_DIR [--version 0] [--cases 10]

Takes checkpoint ``--version`` of a finished run (its specialist makes the prompts, as in relabeling),
relabels the run's selection cases (held-out labeled cases: ACDC's val.list) with every class from the
generalist, once per prompt mode, and scores the pseudo-labels and the specialist against the labels
(:func:`pipeline.class_source.selection_table`). The embedding cache of the run is used, so each slice
is encoded once. Writes ``benchmarks/results/prompt_modes-<run name>-v<version>.json`` and prints the
per-class mean Dice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from benchmarks.common import RESULTS, machine_info, setup_logging
from pipeline.atomic import atomic_write_text
from pipeline.checkpoint import checkpoint_path, load_checkpoint
from pipeline.class_source import selection_table
from pipeline.config import config_from_dict
from pipeline.data.dataset import load_image, load_label, read_data
from pipeline.data.splits import resolve_selection, resolve_split
from pipeline.generalist.factory import embedding_cache, make_generalist
from pipeline.models.unet import build_model
from pipeline.relabel import relabel_case

log = logging.getLogger("benchmarks.prompt_modes")

_MERGED = {"box_min_component_fraction": 0.25}  # pieces of >= 25% of the largest join the box (the default)
_LARGEST = {"box_min_component_fraction": 1.0}  # the box of the largest piece only
MODES: dict[str, dict] = {
    "box": {"use_points": False, "ensemble": 1, **_MERGED},
    "box+points": {"use_points": True, "num_random_positive": 2, "num_negative": 1, "ensemble": 1, **_MERGED},
    "box, ensemble of 3": {"use_points": False, "ensemble": 3, **_MERGED},
    "box of the largest piece": {"use_points": False, "ensemble": 1, **_LARGEST},
    "box of the largest piece, ensemble of 3": {"use_points": False, "ensemble": 3, **_LARGEST},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_modes", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--cases", type=int, default=10)
    args = p.parse_args(argv)
    setup_logging(False, log)
    torch.set_num_threads(2)
    saved = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    base = config_from_dict(saved)
    info = read_data(base.data)
    cases, source = resolve_selection(base.data, info, resolve_split(base.data, info))
    cases = cases[: args.cases]
    ckpt = load_checkpoint(checkpoint_path(args.run_dir, args.version))
    model = build_model(ckpt["model_args"])
    model.load_state_dict(ckpt["trainer"]["student"])
    model.eval()
    device = torch.device("cpu")
    tables = []
    for mode, prompts in MODES.items():
        cfg = config_from_dict({**saved, "prompts": {**saved["prompts"], **prompts},
                                "generalist": {**saved["generalist"], "class_source": "generalist"}})
        generalist = make_generalist(cfg.generalist, device)
        cache = embedding_cache(cfg, generalist)
        for case_id in cases:
            image, _ = load_image(info, case_id, cfg.data.normalization)
            label = np.moveaxis(load_label(info, case_id), cfg.data.slice_axis, 0)
            with torch.inference_mode():
                out = relabel_case(case_id, image, model, generalist, cache, cfg, info.foreground_classes, 1,
                                   args.version, device)
            rows = selection_table(case_id, out.pseudo_label, out.specialist, label, info.foreground_classes, 1)
            tables.append(pd.DataFrame(rows).assign(mode=mode))
        log.info("%s done", mode)
    table = pd.concat(tables)
    means = table.groupby(["mode", "class_id"])[["generalist_dice", "specialist_dice"]].mean().round(4)
    print(means.to_string())
    out = RESULTS / f"prompt_modes-{base.name}-v{args.version}.json"
    atomic_write_text(out, json.dumps({
        "run": str(args.run_dir), "version": args.version, "cases": cases, "cases_from": source,
        "modes": MODES, "means": {f"{m}|{c}": v for (m, c), v in means.to_dict("index").items()},
        "rows": table.to_dict("records"),
        "command": "python -m benchmarks.prompt_modes " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(), "date": dt.datetime.now(dt.timezone.utc).isoformat()}, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
