"""Where a concept's new token vectors start (``--init``).

- ``word``: the initializer word's input embedding, every vector (Textual Inversion, Gal et al. 2022,
  arXiv 2208.01618; today's default);
- ``cross``: the text encoder's *output* for the initializer word (Cross Initialization, Pang et al. 2023,
  arXiv 2312.15905: a learned embedding ends far from its word's input embedding, in scale and direction,
  and near the encoder's output for it);
- a URI: the vectors an :class:`~tinv.training.starts.Initializer` fitted on earlier runs' concepts predicts
  from the concept's own pictures (HyperDreamBooth's idea, Ruiz et al. 2023, arXiv 2307.06949: a start
  learned across many concepts, so each new one needs a fraction of the steps).

The trainer keeps a learned start only when its loss on the concept's fixed batch (the one DVAR uses) is
below the word start's (:meth:`tinv.training.trainer.PackedTrainer.admit`), so a bad prediction costs one pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tinv import storage
from tinv.errors import ConceptDataError, InitializerError
from tinv.families.model import BaseModel, encode_latents
from tinv.files.formats import canonical
from tinv.manifest import PROPERTIES, ConceptSpec

WORD, CROSS, LEARNED = "word", "cross", "learned"


def initializer_id(tokenizer, spec: ConceptSpec) -> int:
    """The one token id of the concept's initializer word (:class:`ConceptDataError` when it is several)."""
    ids = tokenizer.encode(spec.initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConceptDataError(spec.concept_id, f"initializer_token {spec.initializer_token!r} is {len(ids)} tokens "
                                                f"{pieces}; use a one-token word")
    return ids[0]


def word_start(model: BaseModel, spec: ConceptSpec, encoders: int | None = None) -> list[torch.Tensor]:
    """Per text encoder (the first ``encoders``; None: all), ``(num_vectors, D)``: the initializer word's input
    embedding in every row."""
    rows = []
    for tokenizer, encoder in list(zip(model.tokenizers, model.text_encoders))[:encoders]:
        vector = encoder.get_input_embeddings().weight[initializer_id(tokenizer, spec)].detach().float()
        rows.append(vector.expand(spec.num_vectors, -1).clone())
    return rows


@torch.no_grad()
def cross_start(model: BaseModel, spec: ConceptSpec, encoders: int | None = None) -> list[torch.Tensor]:
    """Per text encoder (the first ``encoders``), ``(num_vectors, D)``: the encoder's last hidden state at the
    initializer word in the prompt ``<bos> word <eos>`` (Cross Initialization's ``E(v_init)``), in every row."""
    rows = []
    for tokenizer, encoder in list(zip(model.tokenizers, model.text_encoders))[:encoders]:
        word = initializer_id(tokenizer, spec)
        ids = torch.tensor([[tokenizer.bos_token_id, word, tokenizer.eos_token_id]], device=encoder.device)
        hidden = encoder(ids).last_hidden_state[0, 1].float()
        rows.append(hidden.expand(spec.num_vectors, -1).clone())
    return rows


@dataclass
class Start:
    """A run's start (``--init``): its name, and the fitted initializer when it is a URI."""

    name: str
    initializer: Initializer | None = None

    def vectors(self, model: BaseModel, spec: ConceptSpec, images: torch.Tensor,
                means: torch.Tensor | None = None, encoders: int | None = None) -> list[torch.Tensor] | None:
        """Per text encoder (the first ``encoders``), ``(num_vectors, D)``; None when a learned start has no
        prediction for this concept (no network for its vector count). ``means``: the pictures' VAE latent means,
        if known."""
        if self.name == WORD:
            return word_start(model, spec, encoders)
        if self.name == CROSS:
            return cross_start(model, spec, encoders)
        features = picture_features(model, images, self.initializer.features, means)
        rows = self.initializer.predict(features, spec.learnable_property, spec.num_vectors)
        return None if rows is None else rows[:encoders]


def initializer_uri(init: str) -> str:
    """A learned start's file: ``init`` itself when it names a ``.safetensors`` file, else that folder's
    :data:`INITIALIZER_NAME` (what ``jobs.fit_init --output`` writes)."""
    return init if init.endswith(".safetensors") else storage.join(init, INITIALIZER_NAME)


def load_start(init: str, storage_options: dict | None = None) -> tuple[Start, str]:
    """The start ``--init`` names (``word``, ``cross``, or an initializer's URI, read from storage) and its
    :func:`start_id`; :class:`InitializerError` when the file is not an initializer."""
    if init in (WORD, CROSS):
        return Start(init), init
    uri = initializer_uri(init)
    try:
        data = storage.read_bytes(uri, storage_options)
    except FileNotFoundError as e:
        raise InitializerError(f"no initializer at {uri} (--init: word, cross, or what jobs.fit_init wrote)") from e
    start = Start(LEARNED, Initializer.from_bytes(data))
    return start, start_id(start, data)


def choose(
    start: Start | None, word: list[torch.Tensor], model: BaseModel, spec: ConceptSpec, images: torch.Tensor,
    means: torch.Tensor | None, loss_of: Callable[[list[torch.Tensor]], float],
) -> tuple[list[torch.Tensor], dict]:
    """A concept's start rows and the record of it (``result.json``'s ``start``), ``word`` being its word
    start and ``means`` its pictures' VAE latent means (when known). For another start, ``loss_of`` (the
    fixed-batch loss of some rows) is asked of the word start and of the other; a learned start is kept only
    when its loss is below the word start's."""
    if start is None or start.name == WORD:
        return word, {"init": WORD}
    losses = {WORD: loss_of(word)}
    rows = start.vectors(model, spec, images, means, encoders=len(word))
    if rows is None:
        return word, {"init": WORD, "requested": start.name, "losses": losses,
                      "reason": f"the initializer has no network for {spec.num_vectors} vectors"}
    losses[start.name] = loss_of(rows)
    if start.name == LEARNED and not losses[LEARNED] < losses[WORD]:
        return word, {"init": WORD, "requested": LEARNED, "losses": losses,
                      "reason": "the predicted start's fixed-batch loss was not below the word start's"}
    return rows, {"init": start.name, "requested": start.name, "losses": losses}


def start_id(start: Start, data: bytes | None = None) -> str:
    """What a concept's config fingerprint holds of its start: ``word``, ``cross``, or ``learned:`` and the
    sha256 of the initializer file's bytes ``data`` (a refitted initializer is another start)."""
    return start.name if start.initializer is None else f"{LEARNED}:{hashlib.sha256(data or b'').hexdigest()}"


def dvar_history(record: dict) -> list[float]:
    """What DVAR's fixed-batch history starts from: a kept learned start's word-start loss (the same fixed
    batch), else nothing. DVAR stops when the loss's recent variance is a small share of its whole history's;
    a concept that starts near its optimum has no fall in its own history to measure against, and would
    train to its last step (toy world: 407 steps on average against the word start's 248). Counting the
    fall from the word start to the prediction gives it the history a word start would have had."""
    return [record["losses"][WORD]] if record.get("init") == LEARNED else []

INITIALIZER_NAME = "initializer.safetensors"
FORMAT = "tinv-initializer-1"
VAE_FEATURES = "vae-latents"
GRID = 8
"""Latent means are pooled to GRID × GRID (SD 1.5 at 512 px: 64 × 64 → 8 × 8; the toy model's are 8 × 8)."""
NET_KEYS = ("x_mean", "x_std", "w1", "b1", "w2", "b2", "y_mean", "y_std")


@torch.no_grad()
def picture_features(model: BaseModel, images: torch.Tensor, kind: str = VAE_FEATURES,
                     means: torch.Tensor | None = None) -> torch.Tensor:
    """``(F,)``: the mean and the spread over a concept's pictures (``(N, 3, H, W)`` in [-1, 1]) of their
    VAE latent means pooled to ``GRID`` × ``GRID`` (``vae-latents``; ``means``: those latent means when the
    caller has them already), or of a CLIP image model's embeddings."""
    if kind == VAE_FEATURES:
        latents = encode_latents(model, images)[0] if means is None else means
        per_picture = F.adaptive_avg_pool2d(latents.float(), GRID).flatten(1)
    elif kind.startswith("clip:"):
        per_picture = clip_embeddings(kind.removeprefix("clip:"), images)
    else:
        raise InitializerError(f"unknown image features {kind!r} (expected {VAE_FEATURES!r} or 'clip:<model>')")
    return torch.cat([per_picture.mean(0), per_picture.std(0, unbiased=False)]).cpu()


_CLIP: dict[str, tuple] = {}


def clip_embeddings(name: str, images: torch.Tensor) -> torch.Tensor:
    """``(N, E)`` image embeddings of a CLIP model (hub id or folder; loaded once per process)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if name not in _CLIP:
        _CLIP[name] = (CLIPVisionModelWithProjection.from_pretrained(name).eval(),)
    clip = _CLIP[name][0]
    size = clip.config.image_size
    pixels = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return clip(pixel_values=((pixels.clamp(0, 1) - mean) / std).to(clip.device)).image_embeds.float().cpu()


def _inputs(features: torch.Tensor, properties: list[str]) -> torch.Tensor:
    onehot = torch.tensor([[float(p == q) for q in PROPERTIES] for p in properties])
    return torch.cat([features, onehot], dim=1)


def _forward(net: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Standardised inputs → hidden → standardised targets → targets."""
    h = F.gelu(((x - net["x_mean"]) / net["x_std"]) @ net["w1"].T + net["b1"])
    return (h @ net["w2"].T + net["b2"]) * net["y_std"] + net["y_mean"]


@dataclass
class Initializer:
    """Networks ``(encoder, vector count) → tensors`` for one base model and feature extractor."""

    fingerprint: str
    features: str
    nets: dict[tuple[int, int], dict[str, torch.Tensor]]
    stats: dict = field(default_factory=dict)

    def predict(self, features: torch.Tensor, learnable_property: str, n: int) -> list[torch.Tensor] | None:
        """Per text encoder, ``(n, D)`` predicted from a concept's :func:`picture_features`; None without a
        network for ``n`` vectors."""
        encoders = sorted(e for e, m in self.nets if m == n)
        if not encoders:
            return None
        x = _inputs(features.float()[None], [learnable_property])
        return [_forward(self.nets[e, n], x).view(n, -1) for e in encoders]

    def check(self, fingerprint: str) -> None:
        """Refuse to start concepts of another base model (:class:`InitializerError`)."""
        if fingerprint != self.fingerprint:
            raise InitializerError(f"the initializer was fitted on base model {self.fingerprint[:12]}…, this run's "
                                   f"is {fingerprint[:12]}…: fit one on this model's runs (jobs.fit_init)")

    def to_bytes(self) -> bytes:
        tensors = {f"{e}.{n}.{k}": v.contiguous() for (e, n), net in self.nets.items() for k, v in net.items()}
        metadata = {"format": FORMAT, "base_model_fingerprint": self.fingerprint, "features": self.features,
                    "stats": json.dumps(self.stats, sort_keys=True)}
        return canonical(save_safetensors(dict(sorted(tensors.items())), metadata=metadata))

    @classmethod
    def from_bytes(cls, data: bytes) -> Initializer:
        try:
            tensors = load_safetensors(data)
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        except Exception as e:  # noqa: BLE001 — whatever safetensors raises, the file is not an initializer
            raise InitializerError(f"not an initializer file: {e}") from e
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise InitializerError(f"not an initializer file (format {meta.get('format')!r}, expected {FORMAT!r})")
        nets: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            e, n, name = key.split(".")
            nets.setdefault((int(e), int(n)), {})[name] = value
        return cls(meta["base_model_fingerprint"], meta["features"], nets, json.loads(meta.get("stats", "{}")))


@dataclass(frozen=True)
class Example:
    """One learned concept: its pictures' features, its property, its vectors per text encoder ``(n, D)``."""

    features: torch.Tensor
    learnable_property: str
    vectors: list[torch.Tensor]


def fit_net(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int, seed: int, lr: float = 1e-3,
            weight_decay: float = 1e-2) -> dict[str, torch.Tensor]:
    """A one-hidden-layer MLP from ``x`` ``(N, F)`` to ``y`` ``(N, T)``, full-batch AdamW on standardised
    inputs and targets."""
    gen = torch.Generator().manual_seed(seed)
    net = {"x_mean": x.mean(0), "x_std": x.std(0, unbiased=False).clamp_min(1e-6),
           "y_mean": y.mean(0), "y_std": y.std(0, unbiased=False).clamp_min(1e-6)}
    w1 = (torch.randn(hidden, x.shape[1], generator=gen) / x.shape[1] ** 0.5).requires_grad_()
    w2 = torch.zeros(y.shape[1], hidden).requires_grad_()
    b1, b2 = torch.zeros(hidden).requires_grad_(), torch.zeros(y.shape[1]).requires_grad_()
    params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    target = (y - net["y_mean"]) / net["y_std"]
    for _ in range(steps):
        h = F.gelu(((x - net["x_mean"]) / net["x_std"]) @ w1.T + b1)
        loss = F.mse_loss(h @ w2.T + b2, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net | {k: v.detach().clone() for k, v in params.items()}


def errors(pred: torch.Tensor, true: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """Mean squared error, the same relative to predicting the training mean (1: no better), mean cosine."""
    mse = float(((pred - true) ** 2).mean())
    return {"mse": mse, "relative_mse": mse / max(float(((mean - true) ** 2).mean()), 1e-12),
            "cosine": float(F.cosine_similarity(pred, true, dim=-1).mean())}


def fit(examples: list[Example], fingerprint: str, features: str, holdout: float = 0.2, seed: int = 0,
        steps: int = 2000, hidden: int = 256) -> Initializer:
    """An initializer over ``examples``: per vector count and text encoder, a network fitted on all but a
    held-out share (``holdout``; none below 5 concepts), whose errors go into its ``stats``."""
    nets, stats = {}, {"features": features, "groups": {}}
    for n in sorted({ex.vectors[0].shape[0] for ex in examples}):
        group = [ex for ex in examples if ex.vectors[0].shape[0] == n]
        order = torch.randperm(len(group), generator=torch.Generator().manual_seed(seed)).tolist()
        held = max(1, round(holdout * len(group))) if len(group) >= 5 and holdout > 0 else 0
        test, train = order[:held], order[held:]
        x = _inputs(torch.stack([ex.features.float() for ex in group]), [ex.learnable_property for ex in group])
        report = {"concepts": len(group), "train": len(train), "held_out": held, "encoders": []}
        for e in range(len(group[0].vectors)):
            y = torch.stack([ex.vectors[e].float().flatten() for ex in group])
            nets[e, n] = fit_net(x[train], y[train], hidden, steps, seed)
            if test:
                with torch.no_grad():
                    report["encoders"].append(errors(_forward(nets[e, n], x[test]), y[test], y[train].mean(0)))
        stats["groups"][str(n)] = report
    return Initializer(fingerprint, features, nets, stats)
