"""The predictor actor of ``semisam predict``: a thin shell over ``pipeline.predict.ScanSegmenter``.

Loads the specialist once (its weights come through Ray's object store, put once by the driver) and
segments one scan per call, writing the scan's label file itself; the driver owns the queue.
"""

from __future__ import annotations

from pipeline.predict import Scan, ScanSegmenter
from workers.common import node_info, start_worker


class Predictor:
    def __init__(self, cfg_dict: dict, model_args: dict, weights: dict, generalist: dict | None = None):
        """``generalist``: ``pipeline.predict.generalist_plan``'s answer (``--with-generalist``), else None."""
        cfg, device = start_worker(cfg_dict, "sam")  # placed with the run's workers.sam resources
        self.segmenter = ScanSegmenter(cfg, model_args, weights, device, generalist)

    def ready(self) -> dict:
        return node_info()

    def segment(self, scan: Scan) -> dict:
        """See ``ScanSegmenter.segment``: the scan's output written whole, its metrics when it has a label."""
        return self.segmenter.segment(scan)
