"""Read and validate a concept manifest (Parquet, one row per concept) from any fsspec URI.

The whole table is checked before anything else happens: column types first, then every row,
and every problem found is reported at once (:class:`ManifestError`), each naming its row.
Relative image URIs resolve against the manifest's own folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tinv import storage
from tinv.config import ConceptSpec
from tinv.errors import InvalidInputError
from tinv.webui import default_trigger

_STRING = (pa.types.is_string, pa.types.is_large_string)
_INT = (pa.types.is_integer,)
_FLOAT = (pa.types.is_floating, pa.types.is_integer)
_BOOL = (pa.types.is_boolean,)


def _list_of_strings(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and any(f(t.value_type) for f in _STRING)


COLUMNS: dict[str, tuple[str, tuple[Callable[[pa.DataType], bool], ...]]] = {
    "concept_id": ("string", _STRING),
    "images": ("list<string>", (_list_of_strings,)),
    "placeholder_token": ("string", _STRING),
    "initializer_token": ("string", _STRING),
    "learnable_property": ("string", _STRING),
    "num_vectors": ("int", _INT),
    "steps": ("int", _INT),
    "learning_rate": ("double", _FLOAT),
    "seed": ("int", _INT),
    "flip_p": ("double", _FLOAT),
    "eval_prompts": ("list<string>", (_list_of_strings,)),
    "captions": ("list<string>", (_list_of_strings,)),
    "method": ("string", _STRING),
    "lora_rank": ("int", _INT),
    "class_prompt": ("string or list<string>", (*_STRING, _list_of_strings)),
    "prior_loss_weight": ("double", _FLOAT),
    "trigger": ("string", _STRING),
    "masks": ("list<string>", (_list_of_strings,)),
    "mask_from_alpha": ("bool", _BOOL),
}
"""Column → (type name for messages, predicates on the Arrow type)."""
REQUIRED = ("concept_id", "images")


class ManifestError(InvalidInputError):
    """The manifest breaks the schema; ``problems`` names every bad column and row."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.uri, self.problems = uri, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"manifest {uri} is invalid ({len(problems)} problem(s)):\n{lines}")


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> list[ConceptSpec]:
    """The manifest at ``uri`` as validated specs, in row order; raises :class:`ManifestError`."""
    try:
        data = storage.read_bytes(uri, storage_options)
    except FileNotFoundError as e:
        raise ManifestError(uri, [f"no manifest at {uri}"]) from e
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(uri, [f"not a readable Parquet file: {e}"]) from e
    return specs_from_table(table, base_dir=storage.parent(uri), uri=uri)


def schema_problems(schema: pa.Schema) -> list[str]:
    """Missing, unknown and wrongly typed columns."""
    problems = [f"missing required column {c!r}" for c in REQUIRED if c not in schema.names]
    for field in schema:
        if field.name not in COLUMNS:
            problems.append(f"unknown column {field.name!r} (known: {', '.join(COLUMNS)})")
            continue
        name, checks = COLUMNS[field.name]
        if not pa.types.is_null(field.type) and not any(check(field.type) for check in checks):
            problems.append(f"column {field.name!r} must be {name}, got {field.type}")
    return problems


def specs_from_table(table: pa.Table, base_dir: str = ".", uri: str = "<table>") -> list[ConceptSpec]:
    """Validate ``table`` and build one :class:`ConceptSpec` per row; raises :class:`ManifestError`."""
    problems = schema_problems(table.schema)
    if problems:
        raise ManifestError(uri, problems)
    if table.num_rows == 0:
        raise ManifestError(uri, ["the manifest has no rows"])
    specs: list[ConceptSpec | None] = []
    for i, row in enumerate(table.to_pylist()):
        spec, errors = _row_spec(row, base_dir)
        problems += [f"row {i} (concept_id {row.get('concept_id')!r}): {e}" for e in errors]
        specs.append(spec)
    problems += _clashes(specs)
    if problems:
        raise ManifestError(uri, problems)
    return [s for s in specs if s is not None]


def _row_spec(row: dict[str, Any], base_dir: str) -> tuple[ConceptSpec | None, list[str]]:
    fields = {k: v for k, v in row.items() if v is not None}
    errors = [f"{c} is missing" for c in REQUIRED if c not in fields]
    if errors:
        return None, errors
    for column in ("images", "masks"):  # URIs, relative ones against the manifest's folder
        if column in fields:
            if any(not isinstance(u, str) or not u.strip() for u in fields[column]):
                return None, [f"{column} holds an empty or null URI"]
            fields[column] = tuple(storage.resolve(u, base_dir) for u in fields[column])
    fields["eval_prompts"] = tuple(fields.get("eval_prompts", ()))
    fields["captions"] = tuple(fields.get("captions", ()))
    if isinstance(fields.get("class_prompt"), list):
        fields["class_prompt"] = tuple(fields["class_prompt"])
    try:
        return ConceptSpec(**fields), []
    except ValueError:  # ConceptSpec names every problem; take them one by one
        probe = object.__new__(ConceptSpec)
        for key, value in fields.items():
            object.__setattr__(probe, key, value)
        for f in ConceptSpec.__dataclass_fields__.values():
            if not hasattr(probe, f.name):
                object.__setattr__(probe, f.name, f.default)
        return None, probe.problems()


def _clashes(specs: list[ConceptSpec | None]) -> list[str]:
    """Duplicate concept ids (also up to case: case-insensitive stores), shared tokens, and shared triggers
    (up to case; a default one counted as :func:`tinv.webui.default_trigger` makes it)."""
    problems, ids, tokens, triggers = [], {}, {}, {}
    for i, spec in enumerate(specs):
        if spec is None:
            continue
        key = spec.concept_id.lower()
        if key in ids:
            problems.append(f"row {i} (concept_id {spec.concept_id!r}): concept_id duplicates row {ids[key]}")
        ids.setdefault(key, i)
        for token in spec.tokens:
            if token in tokens:
                problems.append(
                    f"row {i} (concept_id {spec.concept_id!r}): token {token!r} is also row {tokens[token]}'s"
                )
            tokens.setdefault(token, i)
        trigger = (spec.trigger or default_trigger(spec.concept_id)).lower()
        if trigger in triggers:
            problems.append(f"row {i} (concept_id {spec.concept_id!r}): trigger {trigger!r} is also row "
                            f"{triggers[trigger]}'s (set a trigger column to tell them apart)")
        triggers.setdefault(trigger, i)
    return problems


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """``rows`` (dicts with manifest columns, not all rows naming every column) as one table."""
    names = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist alone keeps row 0's keys only
    return pa.Table.from_pylist([{k: row.get(k) for k in names} for row in rows])


def write_manifest(rows: list[dict[str, Any]], uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``rows`` (dicts with manifest columns) as a Parquet manifest at ``uri``."""
    sink = io.BytesIO()
    pq.write_table(manifest_table(rows), sink)
    storage.write_bytes(uri, sink.getvalue(), storage_options)
