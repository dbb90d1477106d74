"""A lora / pivotal concept's files, which diffusers, AUTOMATIC1111, ComfyUI and Forge load as they are.

- ``pytorch_lora_weights.safetensors``: diffusers' layout (``unet.`` + peft's keys), the name
  ``pipe.load_lora_weights(folder)`` looks for;
- ``webui/loras/{trigger}.safetensors`` (:mod:`tinv.webui`): the same LoRA in kohya's layout (``lora_unet_…``
  with ``lora_down`` / ``lora_up`` / ``alpha``), converted by diffusers' ``convert_state_dict_to_kohya``; for
  ``pivotal`` the token's vectors are bundled in it under ``bundle_emb.<trigger>.…``, AUTOMATIC1111's
  convention for a LoRA that brings its own embedding (``string_to_param.*`` for SD 1/2, ``clip_l`` /
  ``clip_g`` for SDXL), so the web UI's prompt word is the trigger.

Both carry the concept's method, rank, token, trigger and base-model fingerprint in their metadata, and the
settings it was trained under (``training``, JSON; kohya's ``ss_`` keys for those it has one for). A LoRA
trained on the text encoders too (``lora_text_encoder``) holds them as ``text_encoder.text_model.…`` (SDXL
also ``text_encoder_2.…``) and, in kohya's layout, ``lora_te_…`` (SDXL ``lora_te1_`` / ``lora_te2_``), the names
those clients read whichever way the installed transformers nests its CLIP model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors.torch import load as load_safetensors

from tinv.formats import SDXL_KEYS, cpu_fp32, to_bytes
from tinv.webui import lora_path

LORA_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name for a pipeline's LoRA (``load_lora_weights(folder)`` finds it)."""


TEXT_PARTS = ("text_encoder", "text_encoder_2")
"""diffusers' names of a pipeline's text encoders, the prefixes of their LoRA keys."""
NESTED = "text_model."
"""The CLIP text model's inner module in the published checkpoints' names (flattened in recent transformers)."""
Text = list[dict[str, torch.Tensor]]


def diffusers_lora(state: dict[str, torch.Tensor], text: Text | None = None) -> dict[str, torch.Tensor]:
    """peft-named UNet LoRA (and text encoders' LoRAs) → diffusers' pipeline layout (``unet.`` + the key,
    ``text_encoder.text_model.`` + the key …)."""
    out = StableDiffusionPipeline.pack_weights(_contiguous(state), "unet")
    for part, layers in zip(TEXT_PARTS, text or []):
        nested = {k if k.startswith(NESTED) else NESTED + k: v for k, v in _contiguous(layers).items()}
        out |= StableDiffusionPipeline.pack_weights(nested, part)
    return out


def kohya_lora(
    state: dict[str, torch.Tensor], token: str | None = None, vectors: list[torch.Tensor] | None = None,
    text: Text | None = None,
) -> dict[str, torch.Tensor]:
    """kohya's layout, with ``vectors`` (per text encoder) bundled as ``token``'s embedding when given. One text
    encoder's keys are ``lora_te_…`` (kohya's SD 1/2 name; diffusers' converter writes SDXL's ``lora_te1_``)."""
    out = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(diffusers_lora(state, text)).items()}
    if text is not None and len(text) == 1:
        out = {k.replace("lora_te1_", "lora_te_", 1) if k.startswith("lora_te1_") else k: v for k, v in out.items()}
    if vectors is not None:
        if "." in token:
            raise ValueError(f"a bundled embedding's token cannot hold a '.' (AUTOMATIC1111 splits on it): {token!r}")
        tensors = cpu_fp32(vectors)
        keys = ["string_to_param.*"] if len(tensors) == 1 else list(SDXL_KEYS)
        out |= {f"bundle_emb.{token}.{k}": v for k, v in zip(keys, tensors)}
    return out


def lora_files(
    concept_id: str, token: str, trigger: str, method: str, rank: int, state: dict[str, torch.Tensor],
    vectors: list[torch.Tensor] | None, metadata: dict[str, str], text: Text | None = None,
) -> dict[str, bytes]:
    """File name → bytes for a concept's diffusers and kohya LoRA files (``vectors``: pivotal's token,
    bundled in the kohya file under the trigger; ``text``: its text encoders' LoRAs)."""
    meta = {"concept_id": concept_id, "token": token, "trigger": trigger, "method": method, "lora_rank": str(rank),
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            **metadata}
    return {
        LORA_NAME: to_bytes(diffusers_lora(state, text), meta),
        lora_path(trigger): to_bytes(kohya_lora(state, trigger, vectors, text), meta),
    }


KOHYA_TRAINING_KEYS = {"ss_max_train_steps": "steps", "ss_seed": "seed", "ss_batch_size_per_device": "batch_size",
                       "ss_learning_rate": "lora_learning_rate", "ss_unet_lr": "lora_learning_rate",
                       "ss_text_encoder_lr": "lora_text_encoder_learning_rate",
                       "ss_caption_dropout_rate": "caption_dropout", "ss_prior_loss_weight": "prior_loss_weight"}
"""kohya's ``ss_`` metadata keys (what sd-scripts writes and the web UIs' LoRA cards show) → our settings' names."""


def training_metadata(training: dict[str, object] | None) -> dict[str, str]:
    """A LoRA file's metadata for the settings it was trained under: all of them as JSON (``training``), and
    those kohya has a key for under its ``ss_`` names (only the ones that apply: no class loss, no key)."""
    if not training:
        return {}
    kohya = {key: str(training[name]) for key, name in KOHYA_TRAINING_KEYS.items() if name in training}
    return {"training": json.dumps(training, sort_keys=True), **kohya}


@dataclass
class LoraFile:
    """A LoRA file read back: the UNet adapter in peft's naming, and a bundled embedding if any."""

    state: dict[str, torch.Tensor]
    """Scaled to alpha = rank: a kohya file's ``alpha / rank`` is folded into its ``lora_B`` weights."""
    token: str | None = None
    vectors: list[torch.Tensor] | None = None
    """A bundled embedding's vectors per text encoder (AUTOMATIC1111's ``bundle_emb``)."""
    text: Text | None = None
    """Its LoRA per text encoder in peft's naming as published (``text_model.encoder.…``;
    :meth:`tinv.lora.Adapters.load` fits it to the installed CLIP); an encoder it has none for gets an empty one;
    None: a UNet-only LoRA."""


def read_lora(data: bytes) -> LoraFile:
    """Either layout (diffusers', or kohya's with ``alpha`` and maybe ``bundle_emb``), through diffusers'
    own ``lora_state_dict`` conversion, text-encoder parts included. Per-layer alphas are refused (ValueError)."""
    state = load_safetensors(data)
    bundle: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("bundle_emb."):
            _, token, part = key.split(".", 2)
            bundle.setdefault(token, {})[part] = value
    if len(bundle) > 1:
        raise ValueError(f"a LoRA bundling {len(bundle)} embeddings; one expected")
    lora = {k: v for k, v in state.items() if not k.startswith("bundle_emb.")}
    converted, alphas = StableDiffusionPipeline.lora_state_dict(lora)
    others = sorted({k.split(".")[0] for k in converted} - {"unet", *TEXT_PARTS})
    if others:
        raise ValueError(f"only UNet and text-encoder LoRAs are read; this one also holds {others}")
    values = set((alphas or {}).values())
    if len(values) > 1:
        raise ValueError(f"per-layer LoRA alphas are not supported: {sorted(values)}")
    alpha = float(values.pop()) if values else None
    unet = _scaled(convert_unet_state_dict_to_peft(_part(converted, "unet")), alpha)
    present = [i for i, part in enumerate(TEXT_PARTS) if any(k.startswith(part + ".") for k in converted)]
    text = [_scaled(convert_state_dict_to_peft(convert_state_dict_to_diffusers(_part(converted, part))), alpha)
            for part in TEXT_PARTS[: present[-1] + 1]] if present else []  # SDXL's second alone: the first {}
    token, parts = next(iter(bundle.items()), (None, None))
    vectors = None
    if parts is not None:
        vectors = [parts[k].float() for k in (["string_to_param.*"] if "string_to_param.*" in parts else SDXL_KEYS)]
    return LoraFile(unet, token, vectors, text or None)


def _part(converted: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The keys of one of a pipeline's parts (``unet``, ``text_encoder`` …), without its prefix."""
    return {k.removeprefix(part + "."): v for k, v in converted.items() if k.startswith(part + ".")}


def _scaled(peft: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """fp32, with a file's ``alpha / rank`` folded into each ``lora_B`` (alpha = rank from then on)."""
    if alpha is not None:
        peft = {k: v * (alpha / peft[k.replace("lora_B", "lora_A")].shape[0]) if ".lora_B." in k else v
                for k, v in peft.items()}
    return {k: v.float() for k, v in peft.items()}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(state, cpu_fp32(list(state.values()))))
