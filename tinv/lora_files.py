"""A lora / pivotal concept's files, which diffusers, AUTOMATIC1111, ComfyUI and Forge load as they are.

- ``pytorch_lora_weights.safetensors``: diffusers' layout (``unet.`` + peft's keys), the name
  ``pipe.load_lora_weights(folder)`` looks for;
- ``webui/loras/{trigger}.safetensors`` (:mod:`tinv.webui`): the same LoRA in kohya's layout (``lora_unet_…``
  with ``lora_down`` / ``lora_up`` / ``alpha``), converted by diffusers' ``convert_state_dict_to_kohya``; for
  ``pivotal`` the token's vectors are bundled in it under ``bundle_emb.<trigger>.…``, AUTOMATIC1111's
  convention for a LoRA that brings its own embedding (``string_to_param.*`` for SD 1/2, ``clip_l`` /
  ``clip_g`` for SDXL), so the web UI's prompt word is the trigger.

Both carry the concept's method, rank, token, trigger and base-model fingerprint in their metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from safetensors.torch import load as load_safetensors

from tinv.formats import SDXL_KEYS, cpu_fp32, to_bytes
from tinv.webui import lora_path

LORA_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name for a pipeline's LoRA (``load_lora_weights(folder)`` finds it)."""


def diffusers_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft-named UNet LoRA → diffusers' pipeline layout (``unet.`` + the key)."""
    return StableDiffusionPipeline.pack_weights(_contiguous(state), "unet")


def kohya_lora(
    state: dict[str, torch.Tensor], token: str | None = None, vectors: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """kohya's layout, with ``vectors`` (per text encoder) bundled as ``token``'s embedding when given."""
    out = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(diffusers_lora(state)).items()}
    if vectors is not None:
        if "." in token:
            raise ValueError(f"a bundled embedding's token cannot hold a '.' (AUTOMATIC1111 splits on it): {token!r}")
        tensors = cpu_fp32(vectors)
        keys = ["string_to_param.*"] if len(tensors) == 1 else list(SDXL_KEYS)
        out |= {f"bundle_emb.{token}.{k}": v for k, v in zip(keys, tensors)}
    return out


def lora_files(
    concept_id: str, token: str, trigger: str, method: str, rank: int, state: dict[str, torch.Tensor],
    vectors: list[torch.Tensor] | None, metadata: dict[str, str],
) -> dict[str, bytes]:
    """File name → bytes for a concept's diffusers and kohya LoRA files (``vectors``: pivotal's token,
    bundled in the kohya file under the trigger)."""
    meta = {"concept_id": concept_id, "token": token, "trigger": trigger, "method": method, "lora_rank": str(rank),
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            **metadata}
    return {
        LORA_NAME: to_bytes(diffusers_lora(state), meta),
        lora_path(trigger): to_bytes(kohya_lora(state, trigger, vectors), meta),
    }


@dataclass
class LoraFile:
    """A LoRA file read back: the UNet adapter in peft's naming, and a bundled embedding if any."""

    state: dict[str, torch.Tensor]
    """Scaled to alpha = rank: a kohya file's ``alpha / rank`` is folded into its ``lora_B`` weights."""
    token: str | None = None
    vectors: list[torch.Tensor] | None = None
    """A bundled embedding's vectors per text encoder (AUTOMATIC1111's ``bundle_emb``)."""


def read_lora(data: bytes) -> LoraFile:
    """Either layout (diffusers', or kohya's with ``alpha`` and maybe ``bundle_emb``), through diffusers'
    own ``lora_state_dict`` conversion. A text-encoder LoRA or per-layer alphas are refused (ValueError)."""
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
    others = sorted({k.split(".")[0] for k in converted} - {"unet"})
    if others:
        raise ValueError(f"only UNet LoRAs are read; this one also holds {others}")
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    values = set((alphas or {}).values())
    if len(values) > 1:
        raise ValueError(f"per-layer LoRA alphas are not supported: {sorted(values)}")
    if values:
        alpha = float(values.pop())
        peft = {k: v * (alpha / peft[k.replace("lora_B", "lora_A")].shape[0]) if ".lora_B." in k else v
                for k, v in peft.items()}
    token, parts = next(iter(bundle.items()), (None, None))
    vectors = None
    if parts is not None:
        vectors = [parts[k].float() for k in (["string_to_param.*"] if "string_to_param.*" in parts else SDXL_KEYS)]
    return LoraFile({k: v.float() for k, v in peft.items()}, token, vectors)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(state, cpu_fp32(list(state.values()))))
