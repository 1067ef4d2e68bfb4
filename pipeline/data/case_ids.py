"""Case ids become file and store paths, so they are checked before use."""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_case_id(case_id: str, what: str = "case id") -> str:
    """Return ``case_id`` if it is a safe single path component, else raise ConfigError.

    Allowed: letters, digits, ``_``, ``-``, ``.``; must start with a letter or digit; no ``..``;
    at most 128 characters. This rules out path separators and traversal.
    """
    if not isinstance(case_id, str) or not _SAFE.match(case_id) or ".." in case_id:
        raise ConfigError(
            f"{what} {case_id!r} is not allowed: use letters, digits, '_', '-', '.' "
            "(starting with a letter or digit, no '..', at most 128 characters)"
        )
    return case_id
