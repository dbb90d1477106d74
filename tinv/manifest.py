"""Read and validate a concept manifest (Parquet, one row per concept) from any fsspec URI.

The whole table is checked before anything else happens: column types first, then every row,
and every problem found is reported at once (:class:`ManifestError`), each naming its row.
Relative image URIs resolve against the manifest's own folder.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tinv import storage
from tinv.errors import InvalidInputError
from tinv.files.webui import TRIGGER, default_trigger

CONCEPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PROPERTIES = ("object", "style")
DEFAULT_INITIALIZER = {"object": "object", "style": "style"}
METHODS = ("ti", "lora", "pivotal")
"""Textual Inversion (new token vectors); DreamBooth-LoRA (an adapter on the UNet, the token read as
plain text); pivotal tuning (new token vectors and an adapter, trained together)."""

@dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn: a manifest row with its defaults resolved."""

    concept_id: str
    """Unique id; names the output folder. ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
    images: tuple[str, ...]
    """Absolute image URIs (1..64)."""
    placeholder_token: str = ""
    """The new word (``ti``, ``pivotal``); default ``<concept_id>``. Must not already be in the vocabulary. For
    ``lora`` plain text the tokenizer reads as it is, one or more words (``sks dog``)."""
    initializer_token: str = ""
    """A single-token word whose embedding seeds every vector; default by property."""
    learnable_property: str = "object"
    """``object`` or ``style``: picks the prompt templates."""
    num_vectors: int = 1
    """Vectors per token; diffusers names them ``<t>``, ``<t>_1``, ``<t>_2``…"""
    steps: int | None = None
    """Optimisation steps; ``None`` takes the run's default."""
    learning_rate: float | None = None
    """AdamW learning rate; ``None`` takes the run's default."""
    seed: int | None = None
    """Seed of this concept's own random stream; ``None`` takes the run's seed."""
    flip_p: float | None = None
    """Probability of a horizontal flip per sample; ``None`` takes the run's default."""
    eval_prompts: tuple[str, ...] = ()
    """Evaluation prompts, ``{}`` standing for the token; empty means the property's default set."""
    captions: tuple[str, ...] = ()
    """One training prompt per image, ``{}`` standing for the token (``a {} on a red star``), instead of the
    property's templates: what the caption names stays with its words, out of the new one. Empty: templates."""
    method: str = "ti"
    """``ti``, ``lora`` or ``pivotal`` (:data:`METHODS`). For ``lora`` the token is not a new word: the
    tokenizer reads it as ordinary text, and may be several words: DreamBooth's rare identifier and the class
    noun, ``sks dog``, which the prompts ``{}`` then carry (``a photo of a {}``); only the adapter learns."""
    lora_rank: int | None = None
    """LoRA rank (``lora``, ``pivotal``); ``None`` takes the run's default."""
    class_prompt: str | tuple[str, ...] = ""
    """Turns DreamBooth's prior preservation on (``lora``, ``pivotal``): the bare class prompt, e.g. ``a photo
    of a dog``, whose pictures the base model draws once per run and class; or several (a list), each drawn
    once and shared the same way, every class picture trained under its own prompt (kohya's captioned
    regularization images): a style's subjects, ``a dog``, ``a house``. A list of one is that one string."""
    prior_loss_weight: float | None = None
    """Weight of the class pictures' loss beside the concept's own; ``None`` takes the run's default."""
    masks: tuple[str, ...] = ()
    """One mask URI per image (white = subject), weighting the loss per latent pixel; or ``mask_from_alpha``."""
    mask_from_alpha: bool = False
    """Each image's alpha channel is its mask (a cut-out subject on a transparent background)."""
    train_t5: bool | None = None
    """FLUX: also learn its vectors in T5 (``ti``, ``pivotal``); ``None`` takes the run's ``--train-t5``."""
    trigger: str = ""
    """Its web-UI files' stem and prompt word (:mod:`tinv.files.webui`); empty: derived from the id at planning."""

    def __post_init__(self) -> None:
        errors = self.problems()
        if errors:
            raise ValueError(f"concept {self.concept_id!r}: " + "; ".join(errors))
        if not isinstance(self.class_prompt, str):  # a list of one is its string: the same concept, hashed the same
            prompts = self.class_prompts  # None: none
            object.__setattr__(self, "class_prompt", prompts[0] if len(prompts) == 1 else prompts or "")
        if not self.placeholder_token:
            object.__setattr__(self, "placeholder_token", f"<{self.concept_id}>")
        if not self.initializer_token:
            object.__setattr__(self, "initializer_token", DEFAULT_INITIALIZER[self.learnable_property])

    def problems(self) -> list[str]:
        """Every schema problem of this spec (empty when valid)."""
        out = []
        if not isinstance(self.concept_id, str) or not CONCEPT_ID.fullmatch(self.concept_id):
            out.append(f"concept_id must match {CONCEPT_ID.pattern}")
        if not 1 <= len(self.images) <= 64:
            out.append(f"images must hold 1..64 URIs, got {len(self.images)}")
        if self.method not in METHODS:
            out.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lora_rank is not None and not 1 <= self.lora_rank <= 1024:
            out.append(f"lora_rank must be in 1..1024, got {self.lora_rank}")
        if self.class_prompt and self.method == "ti":
            out.append("class_prompt needs method lora or pivotal (the class loss of a frozen model trains nothing)")
        prompts = self.class_prompts
        if any(not isinstance(p, str) or not p.strip() or "{" in p or "}" in p for p in prompts):
            out.append(f"class_prompt must be plain text without braces (the bare class), got {self.class_prompt!r}")
        elif len(set(prompts)) != len(prompts):
            out.append(f"class_prompt holds a prompt twice: {self.class_prompt!r}")
        if self.prior_loss_weight is not None and not self.prior_loss_weight >= 0:
            out.append(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.learnable_property not in PROPERTIES:
            out.append(f"learnable_property must be one of {PROPERTIES}, got {self.learnable_property!r}")
        token = self.placeholder_token
        if token and self.method == "lora" and (token != " ".join(token.split()) or "{" in token or "}" in token):
            out.append(f"a lora concept's placeholder_token is plain text (DreamBooth's 'sks dog'), single-spaced "
                       f"and without braces, got {token!r}")
        elif token and self.method != "lora" and (len(token.split()) != 1 or token != token.strip()):
            out.append(f"placeholder_token must be one word without spaces, got {token!r}")
        if self.masks and len(self.masks) != len(self.images):
            out.append(f"masks must hold one mask URI per image ({len(self.images)}), got {len(self.masks)}")
        if self.masks and self.mask_from_alpha:
            out.append("masks and mask_from_alpha both give masks: name one")
        if self.trigger and (not isinstance(self.trigger, str) or not TRIGGER.fullmatch(self.trigger)):
            out.append(f"trigger must match {TRIGGER.pattern} (a file name, no '.'), got {self.trigger!r}")
        if self.initializer_token and len(self.initializer_token.split()) != 1:
            out.append(f"initializer_token must be one word, got {self.initializer_token!r}")
        if not 1 <= self.num_vectors <= 64:
            out.append(f"num_vectors must be in 1..64, got {self.num_vectors}")
        if self.steps is not None and self.steps < 1:
            out.append(f"steps must be >= 1, got {self.steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            out.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.flip_p is not None and not 0 <= self.flip_p <= 1:
            out.append(f"flip_p must be in [0, 1], got {self.flip_p}")
        if any("{}" not in p for p in self.eval_prompts):
            out.append("every eval prompt must contain {} for the token")
        if self.captions and len(self.captions) != len(self.images):
            out.append(f"captions must hold one caption per image ({len(self.images)}), got {len(self.captions)}")
        if any(not isinstance(c, str) or not c.count("{") == c.count("}") == c.count("{}") == 1 for c in self.captions):
            out.append("every caption must contain {} for the token exactly once, and no other brace")
        return out

    @property
    def class_prompts(self) -> tuple[str, ...]:
        """Its class prompts: none without prior preservation, else one or more."""
        if not self.class_prompt:
            return ()
        return (self.class_prompt,) if isinstance(self.class_prompt, str) else tuple(self.class_prompt)

    @property
    def tokens(self) -> list[str]:
        """The token strings diffusers creates for this concept: ``<t>``, ``<t>_1``, …"""
        t = self.placeholder_token
        return [t] + [f"{t}_{i}" for i in range(1, self.num_vectors)]


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
    "train_t5": ("bool", _BOOL),
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
    (up to case; a default one counted as :func:`tinv.files.webui.default_trigger` makes it)."""
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
