"""Textual Inversion, DreamBooth-LoRA and pivotal tuning side by side on the toy world's held-out concepts.

Every method learns the same 12 concepts from the same pictures, captions and prompts (Textual Inversion,
Gal et al. 2022, arXiv 2208.01618; DreamBooth, Ruiz et al. 2022, arXiv 2208.12242, in its LoRA form, with
the plain word :data:`~lab.toyworld.fidelity.LORA_WORD` as its token, and pivotal tuning, a new token and
a LoRA together), and each LoRA method once without and once with prior preservation. Per concept and run:

- **fidelity**, strict and loose (:meth:`Concept.hit`), over the concept's usual prompts;
- **language drift** (DreamBooth, section 4.3): the bare class prompt, the shape word for an object
  (``a square``) and ``a <shape>`` for every shape for a style, drawn by the base model and by the
  personalized one (its LoRA, no token); drift is the rise in the share of samples showing the concept's
  own attribute, its colour (object) or backdrop (style). Textual Inversion changes no weight and the bare
  prompt holds no token, so its samples are the base model's: its drift is 0 by construction;
- the **bytes** of the files the job writes for it and its training **seconds** (the run's wall time over
  its concepts, packed as the job packs them).

Prior preservation uses the job's own class pictures (:mod:`tinv.training.classes`: the base model draws
``class_images`` of each distinct class prompt once, shared by every concept that names it):
:func:`class_prompt` for each concept.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.demo import eval_prompts
from lab.toyworld.fidelity import Draw, Judged, judge, learn, share
from lab.toyworld.scorer import Scorer, pixels
from lab.toyworld.world import OBJECT_PROMPT, SHAPES
from tinv.evaluation.sampling import SampleRequest, sample
from tinv.families import Family
from tinv.families.model import BaseModel, load_base_model
from tinv.files.outputs import learned_files
from tinv.settings import WITH_CLASS_PICTURES, TrainConfig
from tinv.training import classes
from tinv.training.concept import TrainedConcept

RUNS = (("ti", False), ("lora", False), ("lora", True), ("pivotal", False), ("pivotal", True))
"""(method, prior preservation) of every column."""
TOY_LORA_LEARNING_RATES = {"lora": 1e-3, "pivotal": 3e-4}
"""Toy-world choices (``docs/defaults.md``): the LoRA learning rate of each method on the toy model, from a
sweep at 200 steps. The run's default, 1e-4, is diffusers' for Stable Diffusion and under-trains the toy
model's LoRA (``lora`` 0.37 mean fidelity); pivotal's token carries most of a concept, and a faster LoRA
there loses the styles (0.64 at 1e-3)."""


@dataclass
class MethodRow:
    """One concept learned by one method."""

    concept: str
    kind: str
    method: str
    prior: bool
    fidelity: float
    fidelity_loose: float
    bare_share: float
    """Under the bare class prompt, the share of the personalized model's samples showing the attribute."""
    base_share: float
    """The same for the base model."""
    bytes: int
    """All files the job writes for what it learned (diffusers and A1111/kohya layouts)."""
    seconds: float
    drift_se: float = 0.0
    """The drift's standard error, paired: the base and personalized bare-prompt samples share their seeds
    and prompts, so it is the error of the mean per-sample difference (0 where the two draws are one)."""

    @property
    def drift(self) -> float:
        return self.bare_share - self.base_share


def class_prompt(concept: Concept) -> str | tuple[str, ...]:
    """The concept's bare class prompt: ``a square`` for an object; for a style, the bare prompt of every
    shape its captions name (``a circle`` … ``a cross``), each class picture under its own: the prompts its
    drift is measured on, and the very sets the objects of those shapes use."""
    if concept.kind != "style":
        return OBJECT_PROMPT.format(concept.shape)
    return tuple(OBJECT_PROMPT.format(s) for s in SHAPES)


def class_prompts(concept: Concept) -> tuple[str, ...]:
    prompt = class_prompt(concept)
    return (prompt,) if isinstance(prompt, str) else prompt


def bare_word(concept: Concept) -> str:
    """What stands for the token in the bare prompt: the shape word (``a {}`` → ``a square``), or nothing
    (``a {} star`` → ``a star``) for a style."""
    return concept.shape or ""


def shows_attribute(concept: Concept, judged: Judged) -> bool:
    """Does a sample show the concept's own attribute: its colour (object), its backdrop (style)?"""
    item = judged.item
    return item.colour == concept.colour if concept.kind != "style" else item.backdrop == concept.backdrop


def class_pictures(model: BaseModel, concepts: tuple[Concept, ...], cfg: TrainConfig) -> dict:
    """Concept name → (class prompt(s), class pictures ``(M, 3, H, W)``, each picture's prompt), every
    distinct class prompt drawn once, as the job draws them (:func:`tinv.training.classes.generate`)."""
    info = {"base_model_fingerprint": "toyworld", "resolution": model.resolution, "dtype": str(model.dtype)}
    sets = {p: classes.class_set(p, cfg, info) for p in sorted({p for c in concepts for p in class_prompts(c)})}
    with tempfile.TemporaryDirectory() as out:
        classes.generate(model, list(sets.values()), out, batch_size=64)
        pictures = {p: classes.load(out, cls, model.resolution) for p, cls in sets.items()}
    return {c.name: (class_prompt(c), torch.cat([pictures[p] for p in class_prompts(c)]),
                     tuple(p for p in class_prompts(c) for _ in range(len(pictures[p])))) for c in concepts}


def file_bytes(trained: TrainedConcept, family: Family) -> int:
    """All bytes of the files the job writes for what ``trained`` learned, in ``family``'s layouts."""
    return sum(len(b) for b in learned_files(trained, family, {"base_model_fingerprint": "toyworld"}).values())


def compare(
    model_dir: str, scorer: Scorer, cfg: TrainConfig, concepts: tuple[Concept, ...] = CONCEPTS, samples: int = 32,
    seed: int = 0, runs: tuple[tuple[str, bool], ...] = RUNS, lora_learning_rates: dict[str, float] | None = None,
    **gen,
) -> list[MethodRow]:
    """Every concept learned in every run of ``runs`` (``lora_learning_rates``: per method, else ``cfg``'s),
    then every sample drawn in one batched run."""
    model = load_base_model(model_dir, precision="fp32")
    pictures = {}  # output preservation alone draws no class pictures: its class prompts are enough
    if any(prior for _, prior in runs):
        pictures = (class_pictures(model, concepts, cfg) if cfg.prior_preservation in WITH_CLASS_PICTURES
                    else {c.name: (class_prompt(c),) for c in concepts})
    learned, seconds = {}, {}
    for run in runs:
        start = time.perf_counter()
        rate = (lora_learning_rates or {}).get(run[0], cfg.lora_learning_rate)
        learned[run] = learn(model, concepts, replace(cfg, lora_learning_rate=rate), seed=seed, method=run[0],
                             classes=pictures if run[1] else None)
        seconds[run] = (time.perf_counter() - start) / len(concepts)
    keys, draws = [], []
    for i, c in enumerate(concepts):
        keys.append((i, "base"))
        draws.append(Draw(i, word=bare_word(c)))
        for run in runs:
            t = learned[run][c.name]
            keys.append((i, run))
            draws.append(Draw(i, None if t.vectors is None else t.vectors[0], t.spec.placeholder_token, t.lora,
                              t.text_lora))
            if t.lora is not None:  # without one the bare prompt draws the base model's samples
                keys.append((i, run, "bare"))
                draws.append(Draw(i, word=bare_word(c), lora=t.lora, text_lora=t.text_lora))
    found = dict(zip(keys, judge(model, scorer, concepts, draws, samples, seed, **gen)))
    rows = []
    for i, c in enumerate(concepts):
        base = np.array([shows_attribute(c, j) for j in found[i, "base"]], dtype=float)
        for run in runs:
            t = learned[run][c.name]
            drawn = found.get((i, run, "bare"), found[i, "base"])
            bare = np.array([shows_attribute(c, j) for j in drawn], dtype=float)
            rows.append(MethodRow(c.name, c.kind, run[0], run[1], share(found[i, run]),
                                  share(found[i, run], loose=True), float(bare.mean()), float(base.mean()),
                                  file_bytes(t, model.family), seconds[run], paired_se(bare - base)))
    return rows


def paired_se(differences: np.ndarray) -> float:
    """The standard error of the mean of paired per-sample differences (0 for fewer than two)."""
    n = len(differences)
    return float(np.std(differences, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def column(method: str, prior: bool) -> str:
    return f"{method}{' + prior' if prior else ''}"


def markdown(rows: list[MethodRow]) -> str:
    """Fidelity per run, then drift per LoRA run, then bytes and seconds, per concept and kind."""
    runs = list(dict.fromkeys((r.method, r.prior) for r in rows))
    drifting = [run for run in runs if run[0] != "ti"]
    by = {(r.concept, (r.method, r.prior)): r for r in rows}
    names = list(dict.fromkeys(r.concept for r in rows))
    kinds = {r.concept: r.kind for r in rows}
    head = ["concept", "kind", *(column(*run) for run in runs), "base: attribute share",
            *(f"drift, {column(*run)}" for run in drifting)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = [[n] for n in names] + [[n for n in names if kinds[n] == k] for k in ("combination", "unnamed", "style")]
    for group in filter(None, groups):
        label, kind = (group[0], kinds[group[0]]) if len(group) == 1 else (f"**{kinds[group[0]]} mean**", "")
        fid = [f"{np.mean([by[n, run].fidelity for n in group]):.2f}" for run in runs]
        base = f"{np.mean([by[n, runs[0]].base_share for n in group]):.2f}"
        drift = [f"{np.mean([by[n, run].drift for n in group]):+.2f}" for run in drifting]
        lines.append("| " + " | ".join([label, kind, *fid, base, *drift]) + " |")
    lines += ["", "| run | bytes per concept | seconds per concept | mean fidelity | mean loose fidelity "
              "| worst drift |", "|---|---|---|---|---|---|"]
    for run in runs:
        mine = [by[n, run] for n in names]
        worst = max(mine, key=lambda r: r.drift)
        drift = "0 (no weight changes)" if run[0] == "ti" else f"{worst.drift:+.2f} ({worst.concept})"
        lines.append(f"| {column(*run)} | {int(np.mean([r.bytes for r in mine])):,} "
                     f"| {np.mean([r.seconds for r in mine]):.2f} | {np.mean([r.fidelity for r in mine]):.3f} "
                     f"| {np.mean([r.fidelity_loose for r in mine]):.3f} | {drift} |")
    return "\n".join(lines)


def run_table(run: str | Path, scorer: Scorer | None = None) -> list[dict]:
    """Per concept and method, the toy-world metric's strict and loose fidelity that a ``jobs.train`` run of
    ``python -m lab.toyworld.demo DIR --methods …``'s manifest recorded (``{run}/results.parquet``); with
    ``scorer``, also ``attribute``: the share of its samples (``concepts/{id}/samples``) that show the concept's
    own colour (object) or backdrop (style), whatever their shape (:func:`shows_attribute`)."""
    concepts = {c.name: c for c in CONCEPTS}
    rows = []
    for r in pq.read_table(Path(run) / "results.parquet").to_pylist():
        name = r["concept_id"].removesuffix(f"-{r['method']}")
        if name not in concepts:
            raise ValueError(f"{run}: {r['concept_id']!r} is not a held-out concept by a method (ID-METHOD): "
                             "run-table reads a run of python -m lab.toyworld.demo DIR --methods …'s manifest")
        concept = concepts[name]
        metrics = dict(r["metrics"] or [])
        row = {"concept": concept.name, "kind": concept.kind, "method": r["method"], "status": r["status"],
               "fidelity": metrics.get("fidelity"), "fidelity_loose": metrics.get("fidelity_loose"),
               "seconds": r["seconds"]}
        samples = sorted((Path(run) / "concepts" / r["concept_id"] / "samples").glob("*.png"))
        if scorer is not None and samples:
            items = scorer.predict(pixels(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in samples])))
            row["attribute"] = float(np.mean([shows_attribute(concept, Judged(None, False, False, it))
                                              for it in items]))
        rows.append(row)
    return rows


def base_attribute(model: BaseModel, scorer: Scorer, samples: int, batch_size: int = 64) -> dict[str, float]:
    """Per held-out concept, :func:`run_table`'s ``attribute`` of the base model: its eval prompts with the
    initializer word in the token's place (``python -m lab.toyworld.demo``'s), seeds ``0 … samples-1``, drawn at the
    family's sampling as the job draws."""
    requests = [SampleRequest(c, p, seed) for c, concept in enumerate(CONCEPTS) for p in eval_prompts(concept)
                for seed in range(samples)]
    images = sample(model, [None] * len(CONCEPTS), requests, words=[c.initializer for c in CONCEPTS],
                    batch_size=batch_size)
    shown = [shows_attribute(CONCEPTS[r.concept], Judged(None, False, False, it))
             for r, it in zip(requests, scorer.predict(pixels(images)))]
    return {c.name: float(np.mean([s for r, s in zip(requests, shown) if r.concept == k]))
            for k, c in enumerate(CONCEPTS)}


def run_markdown(rows: list[dict], field: str = "fidelity") -> str:
    """``field`` (strict fidelity) per concept and method, then each kind's mean and the overall mean (a failed
    concept: —)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["concept"], r["method"]): r.get(field) for r in rows}
    names = list(dict.fromkeys(r["concept"] for r in rows))
    kinds = {r["concept"]: r["kind"] for r in rows}

    def mean(group: list[str], method: str) -> str:
        found = [by.get((n, method)) for n in group]
        return "—" if None in found else f"{np.mean(found):.2f}"

    lines = ["| concept | kind | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    groups = [([n], n, kinds[n]) for n in names] + [
        ([n for n in names if kinds[n] == k], f"**{k} mean**", "") for k in ("combination", "unnamed", "style")
    ] + [(names, "**mean**", "")]
    for group, label, kind in groups:
        if group:
            lines.append("| " + " | ".join([label, kind, *(mean(group, m) for m in methods)]) + " |")
    return "\n".join(lines)
