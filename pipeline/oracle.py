"""The oracle ceiling: prompts made from the *unlabeled cases' labels*, the leak of the released SemiSAM code.

It is a control, never a result: it says how good the pseudo-labels could be with perfect prompts. A run
asks for it with ``prompts.source: oracle_labels_LEAK`` in its config, and that alone is refused: the run
must also be unlocked outside the config, by the command-line flag :data:`UNLOCK_FLAG` of ``semisam run``
(or ``leak_labels=True`` given by name to :func:`pipeline.coordinator.run`, as a benchmark does). No config
key unlocks it, so no YAML file or dotted override can start an oracle run. The SAM actors refuse an oracle
config unless they are unlocked too (``SamWorker(..., leak_labels=True)``).

Such a run is marked as one on every output: ``state.json`` (``oracle``), ``config.yaml``
(``prompts.source``), each case's arrays in the store (attr ``prompt_source``), and the text of
``semisam eval``, ``inspect`` and ``verify`` (:func:`banner`).
"""

from __future__ import annotations

from pipeline.errors import ConfigError

ORACLE = "oracle_labels_LEAK"
"""The value of ``prompts.source`` that asks for prompts from the unlabeled cases' labels."""
UNLOCK_FLAG = "--i-know-this-leaks-labels"
"""The ``semisam run`` flag without which an oracle config is refused."""
BANNER = ("ORACLE RUN (prompts.source: oracle_labels_LEAK): prompts came from the unlabeled cases' labels, "
          "a leak; this is a ceiling for comparison, not a semi-supervised result")


def is_oracle(cfg) -> bool:
    """Whether a RunConfig (or its JSON tree) asks for oracle prompts."""
    if isinstance(cfg, dict):
        return (cfg.get("prompts") or {}).get("source") == ORACLE
    return cfg.prompts.source == ORACLE


def check_unlocked(cfg, leak_labels: bool, who: str = "semisam run") -> None:
    """Refuse an oracle config that was not unlocked by name (see the module docstring)."""
    if is_oracle(cfg) and not leak_labels:
        raise ConfigError(
            f"prompts.source is {ORACLE}: prompts would be made from the unlabeled cases' labels (a leak). "
            f"{who} refuses it unless asked by name: `semisam run CONFIG ... {UNLOCK_FLAG}` (a benchmark passes "
            "leak_labels=True); no config key or override unlocks it")


def state_mark() -> dict:
    """What ``state.json`` records for an oracle run (key ``oracle``)."""
    return {"prompts": ORACLE, "note": BANNER}


def banner(folder) -> str | None:
    """:data:`BANNER` when the run folder (a :class:`pipeline.run_folder.RunFolder`) holds an oracle run (its
    config or its state.json says so), else None."""
    try:
        if folder.is_run() and is_oracle(folder.saved_config()):
            return BANNER
        if folder.state_loc.exists() and "oracle" in folder.read_state():
            return BANNER
    except Exception:  # noqa: BLE001 - a damaged folder is verify's to report; the mark is best effort
        return None
    return None
