"""A learned start for new concepts: a small network from frozen image features of a concept's pictures to
the token vectors training found for it, fitted on earlier runs' concepts (HyperDreamBooth's idea, Ruiz et
al. 2023, arXiv 2307.06949, for token vectors; ELITE, arXiv 2302.13848, and E4T, arXiv 2302.12228, map
image features to word embeddings the same way).

Features (:func:`picture_features`): the base model's own VAE latent means, pooled to a ``GRID`` × ``GRID``
map, their mean and spread over the concept's pictures (no extra weights); or a CLIP image model's
embeddings (``clip:<model>``), mean and spread the same way. The concept's property (object or style) is
one more input. One network per text encoder and vector count; each is a one-hidden-layer MLP fitted by
full-batch AdamW on standardised features and targets, on all but a held-out share of the concepts, whose
error it reports (:func:`fit`). The file is safetensors, with the base-model fingerprint, the feature
extractor and those statistics in its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tinv.config import PROPERTIES
from tinv.errors import InitializerError
from tinv.formats import canonical
from tinv.models import BaseModel, encode_latents

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
