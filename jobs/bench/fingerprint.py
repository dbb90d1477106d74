"""What the base-model fingerprint costs: hashing an SD 1.5-sized folder, the first time and from the cache."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from jobs.bench.shapes import SD15_TEXT, SD15_UNET, SD15_VAE
from tinv.families.fingerprint import model_fingerprint


def fingerprint_cost(smoke: bool = False) -> dict[str, Any]:
    """Seconds to fingerprint an SD 1.5-shaped folder (random weights, fp32 safetensors), cold and cached."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        text = CLIPTextConfig(**(SD15_TEXT | ({"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                                "num_attention_heads": 2} if smoke else {})))
        CLIPTextModel(text).save_pretrained(root / "text_encoder")
        unet = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), norm_num_groups=32) if smoke else SD15_UNET
        UNet2DConditionModel(**unet).save_pretrained(root / "unet")
        AutoencoderKL(**(dict(SD15_VAE, block_out_channels=(32, 32, 32, 32)) if smoke else SD15_VAE)).save_pretrained(
            root / "vae")
        parts = ("text_encoder", "unet", "vae")
        size = sum(f.stat().st_size for p in parts for f in (root / p).iterdir())
        cache = root / "digests.json"
        start = time.perf_counter()
        first = model_fingerprint(root, parts, cache_file=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = model_fingerprint(root, parts, cache_file=cache)
        warm = time.perf_counter() - start
    assert first == again
    return {"folder_gb": size / 1e9, "cold_s": cold, "cached_s": warm, "cold_gb_per_s": size / 1e9 / cold}
