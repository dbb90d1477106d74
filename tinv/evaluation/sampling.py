"""Samples of learned concepts, batched across concepts, with fixed seeds.

Every concept's vectors sit in a slot of one spliced text encoder, and every concept's LoRA is an
adapter of the denoiser that only its own samples pass through (:mod:`tinv.training.splice`), so a generation
batch can mix any concepts of any method; no pipeline is rebuilt and no file is loaded per concept. The denoiser,
VAE and text encoders are the ones already loaded for training.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from torch import nn

from tinv.families import Conditioning, place
from tinv.families.model import BaseModel
from tinv.training.splice import (
    BASE,
    Adapters,
    register_slot_tokens,
    remove_everywhere,
    routed,
    slot_token_names,
    slot_words,
    spliced,
)


@dataclass(frozen=True)
class SampleRequest:
    """One image to draw: concept index, prompt with ``{}`` for the token, seed."""

    concept: int
    prompt: str
    seed: int


SCHEDULERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "flow-euler": FlowMatchEulerDiscreteScheduler,
}
"""Sampling schedulers by name: multistep DPM-Solver++ (good at ~25 steps) is Stable Diffusion's default, the
flow-matching Euler sampler FLUX.1's (:meth:`tinv.families.Family.sampling`)."""


def pipeline(model: BaseModel, scheduler: str | None = None, text_encoders: bool = False) -> Any:
    """The model family's diffusers pipeline over the loaded modules, with the named sampling scheduler.

    tinv encodes prompts itself (:func:`sample` passes prompt embeddings), so by default the pipeline holds no
    text encoder: it then keeps the embeddings in the denoiser's dtype, where it would cast them to the text
    encoders' (fp32) and a half-precision denoiser would refuse them. ``text_encoders=True`` (for
    ``load_textual_inversion`` and string prompts) gives a pipeline that encodes prompts itself.
    """
    scheduler = scheduler or model.family.sampling(model).scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
    pipe = model.family.pipeline(model, SCHEDULERS[scheduler].from_config(model.scheduler.config), text_encoders)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    model: BaseModel,
    vectors: list[list[torch.Tensor] | None],
    requests: list[SampleRequest],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 16,
    pipe=None,
    words: list[str] | None = None,
    loras: list[dict[str, torch.Tensor] | None] | None = None,
    text_loras: list[list[dict[str, torch.Tensor]] | None] | None = None,
) -> np.ndarray:
    """Draw each request: ``(N, H, W, 3)`` uint8. ``vectors[c][e]`` is concept c's ``(n, D_e)``; None for
    a concept without a new token, whose ``{}`` reads ``words[c]`` as plain text. ``loras[c]``, if given,
    is concept c's UNet LoRA (peft naming), which its samples and only its go through, and ``text_loras[c]``
its LoRA on each text encoder, which its prompts (and their empty negative prompts, as diffusers encodes
them) go through.

    ``steps`` and ``guidance`` not given are the family's (:meth:`tinv.families.Family.sampling`: SD 25 at 5,
    FLUX.1 [dev] 28 at 3.5, [schnell] 4 without guidance).

    An image depends only on its own prompt, vectors, LoRA and seed: the initial noise comes from
    its own ``torch.Generator(seed)``, whatever else shares the batch.
    """
    how = SampleConfig(sample_steps=steps, guidance=guidance, sample_batch_size=batch_size).drawing(model)
    pipe = pipe or pipeline(model)
    loras = loras or [None] * len(vectors)
    text_loras = text_loras or [None] * len(vectors)
    with _adapters(model, loras, text_loras) as routes:
        return _sample(model, vectors, requests, how["steps"], how["guidance"], how["batch_size"], pipe, words, routes)


@contextlib.contextmanager
def _adapters(model: BaseModel, loras: list[dict[str, torch.Tensor] | None],
              text_loras: list[list[dict[str, torch.Tensor]] | None]) -> Iterator[list[str]]:
    """Load each concept's LoRA as adapter ``sample{c}`` (UNet, text encoders) for the duration; yield each
    concept's route."""
    routes = [BASE if lora is None else f"sample{c}" for c, lora in enumerate(loras)]
    modules = [model.denoiser, *model.text_encoders]
    try:
        for name, lora, text in zip(routes, loras, text_loras):
            for module, state in zip(modules, [lora, *(text or [])] if lora is not None else []):
                if state:  # else a text encoder its LoRA leaves alone
                    Adapters.of(module).load(name, state)
        yield routes
    finally:
        for name in set(routes) - {BASE}:
            remove_everywhere(modules, name)


def _sample(model: BaseModel, vectors: list[list[torch.Tensor] | None], requests: list[SampleRequest], steps: int,
            guidance: float, batch_size: int, pipe, words: list[str] | None, routes: list[str]) -> np.ndarray:
    encoders = len(model.text_encoders)
    if any(v is None or len(v) < encoders for v in vectors) and words is None:
        raise ValueError("a concept without vectors in every text encoder needs its word")
    held = [0 if v is None else len(v) for v in vectors]  # the first encoders hold its vectors, the rest its word
    vectors = [v or [torch.zeros(1, model.embedding_dims[0])] for v in vectors]
    max_vectors = max(v.shape[0] for row in vectors for v in row)
    names = slot_token_names(len(vectors), max_vectors)
    said = [slot_words(names[c], vectors[c][0].shape[0], held[c], words and words[c], encoders)
            for c in range(len(vectors))]
    ids = register_slot_tokens(model, names)
    slots = [[nn.Parameter(torch.zeros(max_vectors, d, device=model.device), requires_grad=False)
              for d in model.embedding_dims] for _ in vectors]
    for row, concept in zip(slots, vectors):
        for p, v in zip(row, concept):
            p.data[: len(v)] = v.to(p.device)
    with spliced(model, slots, ids):
        return draw(model, pipe, requests, said, routes, steps=steps, guidance=guidance, batch_size=batch_size,
                    vector_encoders=max(held))


@torch.no_grad()
def draw(model: BaseModel, pipe: Any, requests: list[SampleRequest], said: list[list[str]], routes: list[str], *,
         steps: int, guidance: float, batch_size: int, vector_encoders: int = 1) -> np.ndarray:
    """Draw ``requests`` ``(N, H, W, 3)`` uint8 with the vectors the caller has spliced in: concept ``c``'s ``{}``
    reads ``said[c][e]`` in text encoder ``e``'s prompt (its slot tokens, or plain text) and its samples go through
    adapter ``routes[c]``; batches of ``batch_size`` mix concepts, each image's noise from its own
    ``torch.Generator(seed)``. Every prompt is handed to the family first (:meth:`Family.prepare`: FLUX's T5
    encodes them all at once, then leaves the accelerator unless ``vector_encoders`` says some concept's vectors
    are in T5), and each text encoder is back where it was when drawing ends."""
    size = model.resolution
    texts = [[r.prompt.format(said[r.concept][e]) for r in requests] + [""] for e in range(len(model.text_encoders))]
    homes = [next(encoder.parameters()).device for encoder in model.text_encoders]
    with contextlib.ExitStack() as restore:
        restore.callback(lambda: [place(encoder, home) for encoder, home in zip(model.text_encoders, homes)])
        model.family.prepare(model, [model.tokenize(texts)], vector_encoders)
        return np.concatenate(list(_batches(model, pipe, requests, texts, routes, steps, guidance, batch_size, size)))


def _batches(model: BaseModel, pipe: Any, requests: list[SampleRequest], texts: list[list[str]], routes: list[str],
             steps: int, guidance: float, batch_size: int, size: int) -> Iterator[np.ndarray]:
    """``requests`` drawn ``batch_size`` at a time; ``texts[e][i]``: request ``i``'s prompt for text encoder ``e``
    (followed by ``""``, which the family was handed too)."""
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        with routed([model.denoiser, *model.text_encoders], [routes[r.concept] for r in chunk]):
            cond = _embed(model, [each[i : i + len(chunk)] for each in texts], size)  # (texts end with "")
            empty = model.family.forces_zeros(model)  # as the family's pipeline conditions an empty prompt
            uncond = cond.zeros_like() if empty else _embed(model, [""] * len(chunk), size)
            images = pipe(**model.family.pipeline_embeds(cond, uncond),
                          generator=[torch.Generator().manual_seed(r.seed) for r in chunk], num_inference_steps=steps,
                          guidance_scale=guidance, height=size, width=size, output_type="np").images  # (b, H, W, 3)
        yield (images * 255).round().astype(np.uint8)


def _embed(model: BaseModel, texts: list[str] | list[list[str]], size: int) -> Conditioning:
    """The denoiser's conditioning of ``texts`` (or per text encoder), in its dtype."""
    return model.family.encode(model, model.tokenize(texts), (size, size)).to(model.dtype)


def grid(images: np.ndarray, cols: int) -> Image.Image:
    """Tile ``(N, H, W, 3)`` images into rows of ``cols``."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return Image.fromarray(canvas)


@dataclass(frozen=True)
class SampleConfig:
    """How each concept's evaluation samples are drawn and scored (the train job and jobs.evaluate alike)."""

    samples_per_prompt: int = 2
    """Images per evaluation prompt (seeds 0, 1, …); 0 draws none."""
    sample_steps: int | None = None
    """Denoising steps per evaluation image; none given: the model family's (SD 25, FLUX.1 [dev] 28, [schnell] 4)."""
    guidance: float | None = None
    """Guidance scale; none given: the model family's (SD 5, FLUX.1 [dev] 3.5)."""
    scheduler: str | None = field(default=None, metadata={"choices": tuple(SCHEDULERS)})
    """Sampling scheduler; none given: the model family's (SD: dpm++, multistep DPM-Solver++; FLUX.1: the folder's)."""
    sample_batch_size: int = 16
    """Images per denoising batch (mixing concepts)."""
    metrics: tuple[str, ...] = ()
    """Metric plug-ins to add to the model folder's own: ``NAME[=ARGUMENT]``, e.g.
    ``clip=openai/clip-vit-large-patch14``."""

    def drawing(self, model: BaseModel) -> dict[str, Any]:
        """:func:`draw`'s ``steps``, ``guidance`` and ``batch_size`` for ``model``: these, or its family's."""
        own = model.family.sampling(model)
        return {"steps": self.sample_steps or own.steps,
                "guidance": own.guidance if self.guidance is None else self.guidance,
                "batch_size": self.sample_batch_size}

    def __post_init__(self) -> None:
        checks = {"samples_per_prompt >= 0": self.samples_per_prompt >= 0,
                  "sample_steps >= 1": self.sample_steps is None or self.sample_steps >= 1,
                  "sample_batch_size >= 1": self.sample_batch_size >= 1,
                  f"scheduler in {tuple(SCHEDULERS)}": self.scheduler is None or self.scheduler in SCHEDULERS}
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError("SampleConfig: need " + ", ".join(failed))


def png_bytes(img: Image.Image | np.ndarray) -> bytes:
    """A picture (PIL, or ``(H, W, 3)`` uint8) as PNG bytes."""
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
