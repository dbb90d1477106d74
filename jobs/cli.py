"""Command-line flags generated from typed config dataclasses: one flag per field, its docstring as help.

A field's default is written once, on the field; a job chooses which fields are its flags, in which groups. A
field ``learning_rate: float = 5e-3`` becomes ``--learning-rate`` (``bool``: ``--x/--no-x``; ``T | None``: type
``T``; ``tuple[T, T]``: two values; ``tuple[T, ...]``: any number); ``field(metadata={"choices": ...})``
restricts the values. The help is the docstring's first paragraph, without reST markup.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal under it), first paragraph, one line."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # the class statement's body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            first = inspect.cleandoc(after.value.value).split("\n\n")[0]
            docs[node.target.id] = " ".join(first.split())
    return docs


def _unwrap_optional(kind: Any) -> Any:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return kind


def _argument(name: str, kind: Any, default: Any, doc: str, choices: Any) -> dict[str, Any]:
    """argparse keywords for one field."""
    shown = "required" if default is dataclasses.MISSING else f"default: {default}"
    plain = doc.replace("``", "").replace(":class:", "").replace(":data:", "").replace(":func:", "")
    kwargs: dict[str, Any] = {"dest": name, "help": f"{plain} ({shown})".replace("%", "%%")}
    kind = _unwrap_optional(kind)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        kwargs["type"] = args[0]
        kwargs["nargs"] = "*" if len(args) == 2 and args[1] is Ellipsis else len(args)
    else:
        kwargs["type"] = kind
    if choices is not None:
        kwargs["choices"] = tuple(choices)
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    return kwargs


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    inherit: bool | tuple[str, ...] = False,
) -> None:
    """Add a flag per field of the dataclass ``cls`` to ``parser`` (a parser, which gets a group named after the
    class, or a group): the fields in ``only`` in that order, else every field but ``skip``.

    ``defaults`` replaces some fields' defaults for this command. ``inherit`` (every field, or those named): a flag
    left out is absent from the parsed namespace (so the caller can take the value from elsewhere, e.g. a run's
    record).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = only if only is not None else tuple(n for n in fields if n not in skip)
    group = parser
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group(cls.__name__, (inspect.getdoc(cls) or "").split("\n")[0])
    for name in names:
        f = fields[name]
        default = (defaults or {}).get(f.name, f.default)
        kwargs = _argument(f.name, hints[f.name], default, docs.get(f.name, ""), f.metadata.get("choices"))
        if inherit is True or (inherit and name in inherit):
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] = kwargs["help"].replace("(default:", "(default: the run's, else")
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def values(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``cls`` present in ``args`` (lists back to tuples)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in skip and hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def build(cls: type[C], args: argparse.Namespace, **fixed: Any) -> C:
    """An instance of ``cls`` from the parsed flags, with ``fixed`` fields set by the caller."""
    return cls(**{**values(args, cls, tuple(fixed)), **fixed})
