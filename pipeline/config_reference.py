"""The whole config tree as a reference: every key with its type, default and docstring.

``semisam config`` prints it; ``docs/config.md`` is its output, checked by ``tests/test_config_reference.py``
so that it cannot go stale (regenerate with ``semisam config > docs/config.md``). The text comes from the
pydantic models themselves (the docstring under each field, ``use_attribute_docstrings``).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import RunConfig

HEADER = """# Configuration reference

Generated from `pipeline/config.py` by `semisam config` (do not edit by hand: `semisam config > docs/config.md`;
a test fails when this file is stale). Keys are set in a YAML file (`semisam run conf/demo.yaml`) or as
overrides (`semisam run conf/demo.yaml train.iterations=50 workers.sam.num_workers=4`). Relative paths in a
file resolve against the file's folder, in an override against the current folder. A file may start
from another with `base: other.yaml` (a path relative to the file) and hold only the keys it changes
(mappings merge key by key; `conf/hippocampus_strong_term.yaml` is one).
"""


def _submodel(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def type_name(ann) -> str:
    """A short, readable name of a field's type: ``int | None``, ``"sgd" | "adam"``, ``list[float]``."""
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return json.dumps(value, default=str)


def leaves(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[tuple[str, FieldInfo, type[BaseModel]]]:
    """(dotted key, field, the model that holds it) for every leaf of the tree, depth first."""
    for name, field in model.model_fields.items():
        sub = _submodel(field)
        if sub is not None:
            yield from leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field, model


def reference_markdown() -> str:
    """The reference as Markdown: one table per section (the model that holds the keys)."""
    out = [HEADER]
    section = None
    for key, field, model in leaves():
        head = key.rsplit(".", 1)[0] if "." in key else "(top level)"
        if head != section:
            section = head
            doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out += ["", f"## `{head}`" if head != "(top level)" else "## Top level", ""]
            if doc and model is not RunConfig:
                out += [doc, ""]
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        kind = type_name(field.annotation).replace("|", "\\|")
        out.append(f"| `{key}` | `{kind}` | `{default_text(field)}` | {text} |")
    return "\n".join(out) + "\n"
