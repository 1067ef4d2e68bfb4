"""What a resume's check of completed rounds costs on object storage (issue 31 item 9).

    .venv/bin/python -m benchmarks.resume_scale                       # 1,000 cases x 3 rounds, 20 ms a request
    .venv/bin/python -m benchmarks.resume_scale --cases 10000         # the issue's size (long on 2 shared cores)

A pseudo-label store of ``--cases`` cases x ``--rounds`` rounds (4 slices of 16 x 16 a case, as small as the
check allows: its cost is requests, not bytes) is written locally and uploaded to a moto S3 server on
127.0.0.1 whose every request then waits ``--latency-ms`` (a WSGI middleware, counting requests). The check
is what a resume runs per completed round (``pipeline.resume.invalid_cases``: manifest, one listing,
every chunk of every case read), first with ``damaged_cases`` one case at a time on a sample
(``--serial-sample`` cases: the cost before this issue, extrapolated per case), then on the bounded thread
pool (``pipeline.store.READ_THREADS``) over the whole store. Result: ``benchmarks/results/resume_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine_info, setup_logging

log = logging.getLogger("benchmarks.resume_scale")
RESULT = RESULTS / "resume_scale.json"
BUCKET = "resume-scale"


class SlowServer:
    """moto's S3 app behind a threaded werkzeug server on 127.0.0.1 that sleeps ``latency_s`` in every request
    (when ``slow``) and counts requests by method."""

    def __init__(self, latency_s: float):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.latency_s, self.slow, self.counts, self._lock = latency_s, False, {}, threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def slowed(environ, start_response):
            with self._lock:
                method = environ["REQUEST_METHOD"]
                self.counts[method] = self.counts.get(method, 0) + 1
            if self.slow:
                time.sleep(self.latency_s)
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, slowed, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> SlowServer:
        self.thread.start()
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()

    def requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def _rows(r: int, case_id: str, slices: int) -> list[dict]:
    return [{"round": r, "case_id": case_id, "slice": s, "checkpoint_version": r - 1, "checkpoint_sha256": "",
             "generalist": "bench", "num_prompts": 1, "prompts": "[]", "score_mean": 0.5, "scores": "{}",
             "pseudo_fg_fraction": 0.1, "specialist_fg_fraction": 0.1, "agreement_dice": 0.9,
             "embedding_cached": False} for s in range(slices)]


def write_local_store(root: Path, cases: int, rounds: int, slices: int = 4) -> list[str]:
    from pipeline.store import PseudoLabelStore

    store = PseudoLabelStore(root, create=True, class_ids=[1, 2], slice_axis=0)
    ids = [f"case_{i:05d}" for i in range(cases)]
    rng = np.random.default_rng(0)
    for r in range(1, rounds + 1):
        store.ensure_round(r, r - 1, "bench")
        rows = []
        for c in ids:
            m = rng.integers(0, 3, (slices, 16, 16), dtype=np.uint8)
            store.write_case(r, c, m, m, rng.random((slices, 2)).astype(np.float32), {"checkpoint_version": r - 1})
            rows += _rows(r, c, slices)
        store.append_manifest(rows)
    return ids


def upload(root: Path, url_root: str, threads: int = 16) -> int:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    files = [p for p in root.rglob("*") if p.is_file()]
    prefix = url_root.split(f"s3://{BUCKET}/", 1)[1]

    def put(p: Path) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(root)}", Body=p.read_bytes())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    return len(files)


def check_rounds(url: str, rounds: int, cases: list[str] | None = None) -> dict:
    """The resume's check of each round (``invalid_cases``), or only ``damaged_cases`` of ``cases``."""
    import fsspec

    from pipeline.resume import invalid_cases
    from pipeline.store import PseudoLabelStore

    fsspec.get_filesystem_class("s3").clear_instance_cache()
    store = PseudoLabelStore(url)
    bad = 0
    for r in range(1, rounds + 1):
        if cases is None:
            bad += len(invalid_cases(store, {"checkpoints": {}}, r))
        else:
            bad += len(store.damaged_cases(r, cases))
    return {"bad_cases": bad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--serial-sample", type=int, default=40, help="cases checked one at a time (the old cost)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, log)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    import pipeline.store as store_module

    with tempfile.TemporaryDirectory(prefix="resume_scale_") as tmp, SlowServer(args.latency_ms / 1000) as server:
        t = time.perf_counter()
        ids = write_local_store(Path(tmp) / "store", args.cases, args.rounds)
        url = f"s3://{BUCKET}/runs/bench/pseudo_labels"
        objects = upload(Path(tmp) / "store", url)
        log.info("store of %d cases x %d rounds: %d objects, written and uploaded in %.0f s", args.cases,
                 args.rounds, objects, time.perf_counter() - t)
        server.slow = True
        saved_threads = store_module.READ_THREADS
        store_module.READ_THREADS = 1
        before, t = server.requests(), time.perf_counter()
        check_rounds(url, 1, ids[: args.serial_sample])
        serial_s, serial_req = time.perf_counter() - t, server.requests() - before
        store_module.READ_THREADS = saved_threads
        before, t = server.requests(), time.perf_counter()
        found = check_rounds(url, args.rounds)
        parallel_s, parallel_req = time.perf_counter() - t, server.requests() - before
    per_case_serial = serial_s / args.serial_sample
    total_cases = args.cases * args.rounds
    result = {
        "benchmark": "resume_scale", "cases": args.cases, "rounds": args.rounds, "latency_ms": args.latency_ms,
        "objects": objects, "read_threads": saved_threads,
        "parallel": {"seconds": round(parallel_s, 1), "requests": parallel_req,
                     "requests_per_case": round(parallel_req / total_cases, 2), "bad_cases": found["bad_cases"]},
        "serial_sample": {"cases": args.serial_sample, "seconds": round(serial_s, 2), "requests": serial_req,
                          "extrapolated_seconds": round(per_case_serial * total_cases, 1)},
        "extrapolated_10k_x3_seconds": round(parallel_s / total_cases * 10000 * 3, 1),
        "goal_s": 60, "machine": machine_info(),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    log.info("resume check of %d cases x %d rounds at %.0f ms a request: %.1f s, %d requests (one case at a time: "
             "%.1f s extrapolated); written to %s", args.cases, args.rounds, args.latency_ms, parallel_s,
             parallel_req, per_case_serial * total_cases, RESULT)


if __name__ == "__main__":
    main()
