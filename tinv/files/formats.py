"""The files a concept's learning becomes, in the layouts the clients load as they are, byte-reproducibly.

- ``learned_embeds.safetensors``: diffusers' ``load_textual_inversion`` layout (the family's keys: SD
  ``{token: (n, D)}``, SDXL ``clip_l`` / ``clip_g``);
- ``webui/embeddings/{trigger}.safetensors`` (:mod:`tinv.files.webui`): the web UIs' layout (SD ``emb_params``);
- ``pytorch_lora_weights.safetensors``: the layout the family's pipeline's ``load_lora_weights(folder)`` reads;
- ``webui/loras/{trigger}.safetensors``: the same LoRA in kohya's layout; for ``pivotal`` the token's vectors are
  bundled in it under ``bundle_emb.<trigger>.…``, AUTOMATIC1111's convention for a LoRA that brings its own
  embedding, so the web UI's prompt word is the trigger (diffusers' ``load_lora_weights`` refuses those keys, and
  ComfyUI and Forge do not read them: they take the embedding file);
- ``concepts-library/``: the sd-concepts-library layout, on request.

Every file carries the concept's method, rank, token, trigger, the base model's family and fingerprint (kohya's
``ss_base_model_version`` and the model spec's architecture, which AUTOMATIC1111 lists a LoRA by) and the settings
it was trained under (``training``, JSON; kohya's ``ss_`` keys for those it has one for). Key layouts are the
family's (:mod:`tinv.families`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tinv import __version__
from tinv.families import Family, contiguous
from tinv.files.webui import embedding_path, lora_path

DIFFUSERS_NAME = "learned_embeds.safetensors"
LORA_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name for a pipeline's LoRA (``load_lora_weights(folder)`` finds it)."""
CONCEPTS_LIBRARY = "concepts-library"
"""Folder of the sd-concepts-library layout (``--export concepts-library``)."""
BUNDLE = "bundle_emb"
ARCHITECTURE = "modelspec.architecture"
Text = list[dict[str, torch.Tensor]]


def keyed(keys: tuple[str, ...], vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One key per text encoder's vectors (the first encoders': FLUX's CLIP-L alone unless T5's train too), as
    CPU fp32 copies."""
    if not 1 <= len(vectors) <= len(keys):
        raise ValueError(f"{len(vectors)} text encoders' vectors for the keys {keys}")
    return contiguous(dict(zip(keys, vectors)))


def diffusers_embedding(family: Family, token: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' layout: keyed by the token (one text encoder) or the family's keys (SDXL ``clip_l``, ``clip_g``)."""
    return keyed(family.embedding_keys or (token,), vectors)


def canonical(data: bytes) -> bytes:
    """safetensors ``data`` with its header's ``__metadata__`` map in sorted key order, so the same tensors and
    metadata give the same bytes. safetensors writes that map in a random order on every save
    (safetensors#584; 19–20 distinct sha256 in 20 writes); the tensors, their order and offsets are kept."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Reproducible safetensors bytes, with tinv's version added to the string metadata."""
    return canonical(save_safetensors(tensors, metadata={**metadata, "tinv_version": __version__}))


def architecture(metadata: dict[str, str], kind: str) -> dict[str, str]:
    """``metadata`` with the model spec's architecture naming the file's kind, as kohya writes it
    (``stable-diffusion-v1/lora``, ``…/textual-inversion``), where the base model's is given."""
    arch = metadata.get(ARCHITECTURE)
    return {**metadata, ARCHITECTURE: f"{arch}/{kind}"} if arch else metadata


def embedding_files(family: Family, concept_id: str, token: str, trigger: str, vectors: list[torch.Tensor],
                    metadata: dict[str, str]) -> dict[str, bytes]:
    """File name → bytes for a concept's diffusers embedding and its web-UI one (named for its trigger)."""
    meta = {"concept_id": concept_id, "token": token, "trigger": trigger, **architecture(metadata,
                                                                                       "textual-inversion")}
    return {DIFFUSERS_NAME: to_bytes(diffusers_embedding(family, token, vectors), meta),
            embedding_path(trigger): to_bytes(keyed(family.webui_embedding_keys, vectors), meta)}


def concepts_library_files(family: Family, token: str, vectors: list[torch.Tensor], learnable_property: str
                           ) -> dict[str, bytes]:
    """The sd-concepts-library layout, which its notebooks and ``load_textual_inversion(folder)`` load:
    ``learned_embeds.bin`` (``torch.save`` of diffusers' layout), ``token_identifier.txt`` (the token) and
    ``type_of_concept.txt`` (``object`` or ``style``)."""
    sink = io.BytesIO()
    torch.save(diffusers_embedding(family, token, vectors), sink)
    return {f"{CONCEPTS_LIBRARY}/learned_embeds.bin": sink.getvalue(),
            f"{CONCEPTS_LIBRARY}/token_identifier.txt": token.encode(),
            f"{CONCEPTS_LIBRARY}/type_of_concept.txt": learnable_property.encode()}


def webui_lora(family: Family, state: dict[str, torch.Tensor], text: Text | None = None,
               bundle: tuple[str, list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """kohya's layout of the LoRA, with ``bundle`` (a token and its vectors per text encoder) as AUTOMATIC1111's
    bundled embedding."""
    out = family.kohya_lora(family.diffusers_lora(state, text), len(text or []))
    if bundle is not None:
        token, vectors = bundle
        if "." in token:
            raise ValueError(f"a bundled embedding's token cannot hold a '.' (AUTOMATIC1111 splits on it): {token!r}")
        out |= {f"{BUNDLE}.{token}.{k}": v for k, v in keyed(family.bundle_keys, vectors).items()}
    return out


def lora_files(family: Family, concept_id: str, token: str, trigger: str, method: str, rank: int,
               state: dict[str, torch.Tensor], vectors: list[torch.Tensor] | None, metadata: dict[str, str],
               text: Text | None = None) -> dict[str, bytes]:
    """File name → bytes for a concept's diffusers and kohya LoRA files (``vectors``: pivotal's token, bundled in
    the kohya file under the trigger; ``text``: its text encoders' LoRAs)."""
    meta = {"concept_id": concept_id, "token": token, "trigger": trigger, "method": method, "lora_rank": str(rank),
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            **architecture(metadata, "lora")}
    bundle = (trigger, vectors) if vectors is not None and family.bundle_keys else None
    return {LORA_NAME: to_bytes(contiguous(family.diffusers_lora(state, text)), meta),
            lora_path(trigger): to_bytes(webui_lora(family, state, text, bundle), meta)}


def training_metadata(family: Family, training: dict[str, object] | None) -> dict[str, str]:
    """A LoRA file's metadata for the settings it was trained under: all of them as JSON (``training``), and
    those kohya has a key for under its ``ss_`` names (the family's; only the ones that apply)."""
    if not training:
        return {}
    kohya = {key: str(training[name]) for key, name in family.training_keys.items() if name in training}
    return {"training": json.dumps(training, sort_keys=True), **kohya}


@dataclass
class LoraFile:
    """A LoRA file read back: its adapters (:class:`tinv.families.LoraParts`), and a bundled embedding if any."""

    state: dict[str, torch.Tensor]
    """The denoiser's adapter in peft's naming, scaled to alpha = rank."""
    token: str | None = None
    vectors: list[torch.Tensor] | None = None
    """A bundled embedding's vectors per text encoder (AUTOMATIC1111's ``bundle_emb``)."""
    text: Text | None = None
    """Its LoRA per text encoder, named as the model's text encoders name their layers; None: denoiser only."""


def read_lora(data: bytes, model) -> LoraFile:
    """Either layout (the pipeline's, or kohya's with ``alpha`` and maybe ``bundle_emb``), for ``model``
    (:class:`tinv.families.model.BaseModel`), through its family. Per-layer alphas are refused (ValueError)."""
    state = load_safetensors(data)
    bundle: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(BUNDLE + "."):
            _, token, part = key.split(".", 2)
            bundle.setdefault(token, {})[part] = value
    if len(bundle) > 1:
        raise ValueError(f"a LoRA bundling {len(bundle)} embeddings; one expected")
    parts = model.family.read_lora({k: v for k, v in state.items() if not k.startswith(BUNDLE + ".")}, model)
    token, found = next(iter(bundle.items()), (None, None))
    vectors = None if found is None else [found[k].float() for k in model.family.bundle_keys]
    return LoraFile(parts.denoiser, token, vectors, parts.text)
