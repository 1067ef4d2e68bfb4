"""Errors a user can act on. Each message names the file, case or key and what is wrong."""

from __future__ import annotations


class SemisamError(Exception):
    """Base of every error meant for the user (the CLI prints these without a traceback)."""


class ConfigError(SemisamError):
    """A config file, key or override is wrong."""


class DatasetError(SemisamError):
    """The dataset on disk is incomplete or inconsistent; the message lists every problem found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"dataset check failed ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
        super().__init__("\n  ".join([head, *self.problems]))


class CheckpointError(SemisamError):
    """A model checkpoint is missing, unreadable or does not match the model it is loaded into."""


class StoreError(SemisamError):
    """The pseudo-label store or a run folder is missing or inconsistent."""


class RunLockedError(SemisamError):
    """Another driver holds the run folder."""


class PlacementError(SemisamError):
    """The Ray cluster cannot place the actors a run needs; the message names the missing resources."""


class WorkerError(SemisamError):
    """An actor failed in a way the run cannot recover from; the message names the actor, case and cause."""


class NonFiniteError(SemisamError):
    """Training produced a NaN or infinite loss or weight: the run stops, the last good checkpoint is kept."""


class HungError(SemisamError):
    """An actor did not answer within its deadline (it was killed and replaced, or the run stopped)."""


class Interrupted(SemisamError):
    """The run was stopped by SIGINT/SIGTERM; completed work is kept and a rerun resumes."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}: completed work is kept; "
                         "rerun the same command to resume")
