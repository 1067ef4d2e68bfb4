"""The run folder: its layout, ``state.json`` and the saved config, on local paths and URLs alike.

Layout (``output_dir/name``; a local path or an fsspec URL, see :mod:`pipeline.storage`)::

    config.yaml          the resolved config, absolute paths (a resume must match it: ``prepare``)
    state.json           completed rounds, their summaries, each checkpoint's SHA-256 (``read_state``)
    driver.lock          the driver that owns the folder (:mod:`pipeline.run_lock`)
    checkpoints/         ckpt_NNNN.pt (+ .sha256), one per round
    pseudo_labels/       the store (masks.zarr + manifest/), see :mod:`pipeline.store`
    embeddings.zarr/     the embedding cache (unless ``generalist.cache_dir`` names a shared one)
    generalist/          adapted_decoder.pt: the adapted generalist's decoder (``generalist.adapt``)
    eval/ audit/ selection/   round_NNN.parquet per round: test metrics, pseudo-label audit, class sources
    eval/val_round_NNN.parquet   validation metrics per round (runs with a validation split)
    tb/                  TensorBoard events (:mod:`pipeline.events`)

Every reader and writer of these names goes through :class:`RunFolder`; nothing else spells them.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.storage import Location

Table = Literal["eval", "audit", "selection"]
TABLES: tuple[Table, ...] = ("eval", "audit", "selection")


def empty_state() -> dict:
    """The state of a run folder where no round is done."""
    return {"completed": [], "summaries": [], "checkpoints": {}}


def _damaged_state(loc: Location, why: str) -> ConfigError:
    return ConfigError(f"{loc} is damaged ({why}); it records which rounds are done. Restore it, or delete it "
                       "to redo every round (checkpoints and pseudo-labels are rewritten)")


class RunFolder:
    """One run folder (see the module docstring). Cheap to make; touches storage only when asked."""

    CONFIG = "config.yaml"
    STATE = "state.json"
    LOCK = "driver.lock"
    EVENTS = "tb"

    def __init__(self, where: str | os.PathLike | Location, storage_options: dict | None = None):
        self.root = Location.of(where, storage_options)

    def __str__(self) -> str:
        return str(self.root)

    # -- names -----------------------------------------------------------------------------------
    @property
    def config_loc(self) -> Location:
        return self.root / self.CONFIG

    @property
    def state_loc(self) -> Location:
        return self.root / self.STATE

    @property
    def lock_loc(self) -> Location:
        return self.root / self.LOCK

    @property
    def checkpoints(self) -> Location:
        return self.root / "checkpoints"

    def checkpoint(self, version: int) -> Location:
        """``checkpoints/ckpt_NNNN.pt`` of checkpoint ``version`` (the one round ``version`` trained)."""
        return self.checkpoints / f"ckpt_{version:04d}.pt"

    @property
    def pseudo_labels(self) -> Location:
        return self.root / "pseudo_labels"

    @property
    def embeddings(self) -> Location:
        return self.root / "embeddings.zarr"

    @property
    def adapted_decoder(self) -> Location:
        """``generalist/adapted_decoder.pt``: the decoder fitted by ``generalist.adapt`` (SHA-256 in state.json)."""
        return self.root / "generalist" / "adapted_decoder.pt"

    @property
    def events(self) -> Location:
        return self.root / self.EVENTS

    def table(self, kind: Table, round_index: int) -> Location:
        """``<kind>/round_NNN.parquet``: the test metrics (eval), audit or class-source table of a round."""
        return self.root / kind / f"round_{round_index:03d}.parquet"

    def val_table(self, round_index: int) -> Location:
        """``eval/val_round_NNN.parquet``: a round's metrics on the validation split (beside its test table)."""
        return self.root / "eval" / f"val_round_{round_index:03d}.parquet"

    def val_tables(self) -> list[Location]:
        """Every ``eval/val_round_*.parquet`` there is, in round order."""
        folder = self.root / "eval"
        names = sorted(n for n in folder.list_names() if n.startswith("val_round_") and n.endswith(".parquet"))
        return [folder / n for n in names]

    def tables(self, kind: Table) -> list[Location]:
        """Every ``<kind>/round_*.parquet`` there is, in round order (listing works on object storage)."""
        folder = self.root / kind
        names = sorted(n for n in folder.list_names() if n.startswith("round_") and n.endswith(".parquet"))
        return [folder / n for n in names]

    # -- the saved config --------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether the folder holds a run (its ``config.yaml``)."""
        return self.config_loc.exists()

    def saved_config(self) -> dict:
        """The saved config as a dict, keys added since it was written filled with their defaults, and
        ``train.schedule_rounds`` fixed (runs older than that key followed ``rounds``)."""
        from pipeline.config import with_defaults

        saved = with_defaults(self._config_tree())
        try:
            saved["train"]["schedule_rounds"] = saved["train"].get("schedule_rounds") or saved["rounds"]
        except (KeyError, TypeError, AttributeError) as e:
            raise self._damaged_config(f"no {e} key where a run's config has one") from None
        return saved

    def _config_tree(self) -> dict:
        """``config.yaml`` parsed; a file that is not YAML, or not a mapping, is an error naming it."""
        try:
            tree = yaml.safe_load(self.config_loc.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise self._damaged_config(str(e).replace("\n", " ")) from None
        if not isinstance(tree, dict):
            raise self._damaged_config(f"it holds a {type(tree).__name__}, not a mapping of config keys")
        return tree

    def _damaged_config(self, why: str) -> ConfigError:
        return ConfigError(f"{self.config_loc} is damaged ({why[:200]}); it is the run's saved config. Restore "
                           "it (e.g. `semisam config --resolved CONFIG [overrides] > config.yaml`), or pick a "
                           "new name= / output_dir= to start the run anew")

    def load_config(self):
        """The saved config, validated (``RunConfig``); errors name ``config.yaml``."""
        from pipeline.config import config_from_dict

        return config_from_dict(self._config_tree(), source=str(self.config_loc))

    def config_if_any(self):
        """:meth:`load_config`, or None when the folder holds no run (a store read on its own)."""
        return self.load_config() if self.is_run() else None

    @classmethod
    def of_store(cls, store_root: str | os.PathLike | Location) -> RunFolder:
        """The run folder a pseudo-label store sits in (its parent)."""
        return cls(Location.of(store_root).parent)

    def write_config(self, cfg) -> None:
        from pipeline.config import dump_config

        self.root.mkdir()
        self.config_loc.write_text(dump_config(cfg))

    # -- state.json ------------------------------------------------------------------------------
    def read_state(self) -> dict:
        """state.json (:func:`empty_state` when there is none); a damaged file is named."""
        loc = self.state_loc
        if not loc.exists():
            return empty_state()
        try:
            state = json.loads(loc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _damaged_state(loc, str(e)) from None
        if not isinstance(state, dict):
            raise _damaged_state(loc, f"it holds a {type(state).__name__}, not an object")
        state.setdefault("checkpoints", {})
        state.setdefault("summaries", [])
        shapes = {"completed": list, "summaries": list, "checkpoints": dict}
        wrong = [k for k, kind in shapes.items() if not isinstance(state.get(k), kind)]
        if wrong or not all(isinstance(r, int) for r in state["completed"]):
            raise _damaged_state(loc, f"{', '.join(wrong) or 'completed'} missing or of the wrong type")
        return state

    def save_state(self, state: dict) -> None:
        self.state_loc.write_text(json.dumps(state, indent=1))
