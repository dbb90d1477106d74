"""Fingerprint v2: the files that shape a learned vector, exactly and once per node; the weights chosen once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from tinv.families.fingerprint import model_fingerprint, weight_choice
from tinv.families.model import load_base_model
from tinv.families.sd import SD


def test_the_unet_counts_a_copy_is_the_same_model_and_only_loaded_files_count(tiny_models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_models["sd1"], a)
    shutil.copytree(tiny_models["sd1"], b)
    fp = model_fingerprint(a, SD.parts, cache_file=None)
    assert fp == model_fingerprint(b, SD.parts, cache_file=None)  # the same files anywhere
    assert load_base_model(str(a)).fingerprint == fp
    shutil.copy(a / "unet" / "diffusion_pytorch_model.safetensors", a / "unet" / "diffusion_pytorch_model.bin")
    assert model_fingerprint(a, SD.parts, cache_file=None) == fp  # a .bin beside the .safetensors is not read
    unet = UNet2DConditionModel.from_pretrained(b / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)  # a fine-tune of the UNet under the same text encoder
    unet.save_pretrained(b / "unet")
    assert model_fingerprint(b, SD.parts, cache_file=None) != fp
    (a / "tinv_templates.json").write_text(json.dumps({"object": ["a {}"], "style": ["{} art"]}))
    assert model_fingerprint(a, SD.parts, cache_file=None) != fp  # other training templates, another result


def test_the_half_precision_variant_is_loaded_and_fingerprinted_where_the_folder_has_one(tiny_models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["sd1"], folder)
    UNet2DConditionModel.from_pretrained(folder / "unet").to(torch.float16).save_pretrained(
        folder / "unet", variant="fp16")
    assert weight_choice(folder / "unet", "fp16") == ("fp16", True)
    assert weight_choice(folder / "vae", "fp16") == (None, True)  # no fp16 file there: the full one
    assert weight_choice(folder / "unet", None) == (None, True)
    half = load_base_model(str(folder), precision="bf16")
    stored = load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert torch.equal(half.denoiser.conv_out.bias.float(), stored["conv_out.bias"].float().to(torch.bfloat16).float())
    assert half.fingerprint == model_fingerprint(folder, SD.parts, "fp16", cache_file=None)
    assert half.fingerprint != load_base_model(str(folder)).fingerprint  # another file, another fingerprint


def test_digests_are_kept_per_node_and_the_command_prints_the_same_value(tiny_models, tmp_path):
    cache = tmp_path / "digests.json"
    fp = model_fingerprint(tiny_models["sd1"], SD.parts, cache_file=cache)
    kept = json.loads(cache.read_text())
    unet_key = next(k for k in kept if k.split(":")[0].endswith("unet/diffusion_pytorch_model.safetensors"))
    cache.write_text(json.dumps({**kept, unet_key: "0" * 64}))  # the kept digest is what counts next time
    assert model_fingerprint(tiny_models["sd1"], SD.parts, cache_file=cache) != fp
    printed = subprocess.run([sys.executable, "-m", "tinv.families.fingerprint", str(tiny_models["sd1"])], check=True,
                             capture_output=True, text=True).stdout.strip()
    assert printed == load_base_model(str(tiny_models["sd1"])).fingerprint
