"""A hub id downloads one copy of each weight (diffusers' own choice), offline here; timeouts are retried."""

from __future__ import annotations

import fnmatch
import json
import re
import types

import diffusers.pipelines.pipeline_utils as pipeline_utils
import pytest
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import httpx  # the httpx the hub client uses (its own package name varies)

from tinv.errors import ModelLayoutError, ModelUnavailableError
from tinv.families import model as hub

SD15_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
              "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def sd15_files() -> list[str]:
    """runwayml/stable-diffusion-v1-5's file names."""
    files = ["model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
             "v1-5-pruned-emaonly.safetensors", "feature_extractor/preprocessor_config.json",
             "scheduler/scheduler_config.json", *(f"tokenizer/{n}" for n in TOKENIZER),
             "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_pytorch_model.non_ema.safetensors"]
    for folder, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("text_encoder", "pytorch_model"), ("safety_checker", "pytorch_model")):
        safe = "model" if stem == "pytorch_model" else stem
        files += [f"{folder}/config.json", f"{folder}/{stem}.bin", f"{folder}/{safe}.safetensors",
                  f"{folder}/{stem}.fp16.bin", f"{folder}/{safe}.fp16.safetensors"]
    return files


def sdxl_files() -> list[str]:
    """stabilityai/stable-diffusion-xl-base-1.0's file names."""
    files = ["model_index.json", "README.md", "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
             "sd_xl_offset_example-lora_1.0.safetensors", "scheduler/scheduler_config.json",
             *(f"tokenizer{s}/{n}" for s in ("", "_2") for n in TOKENIZER)]
    for folder in ("text_encoder", "text_encoder_2"):
        files += [f"{folder}/{n}" for n in ("config.json", "model.safetensors", "model.fp16.safetensors", "model.onnx",
                                            "openvino_model.bin", "openvino_model.xml", "flax_model.msgpack")]
    files += [f"unet/{n}" for n in ("config.json", "diffusion_pytorch_model.safetensors", "model.onnx",
                                    "diffusion_pytorch_model.fp16.safetensors", "model.onnx_data", "openvino_model.bin",
                                    "openvino_model.xml", "diffusion_flax_model.msgpack")]
    for folder in ("vae", "vae_1_0"):
        files += [f"{folder}/config.json", f"{folder}/diffusion_pytorch_model.safetensors",
                  f"{folder}/diffusion_pytorch_model.fp16.safetensors"]
    files += ["vae/diffusion_flax_model.msgpack"]
    files += [f"vae_{p}/{n}" for p in ("decoder", "encoder")
              for n in ("config.json", "model.onnx", "openvino_model.bin")]
    return files


def chosen(monkeypatch, tmp_path, files: list[str], index: dict, variant: str | None) -> list[str]:
    """The files tinv's download would fetch, with the hub's listing and download calls stubbed."""
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    asked = {}
    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda *a, **k: "main")
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *a, **k: types.SimpleNamespace(
        siblings=[types.SimpleNamespace(rfilename=f) for f in files], sha="0" * 40))
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda *a, **k: str(tmp_path / "model_index.json"))
    monkeypatch.setattr(pipeline_utils, "snapshot_download", lambda repo, **k: asked.update(k) or str(tmp_path))
    assert hub.download("acme/model", variant) == str(tmp_path)
    allow = [re.compile(fnmatch.translate(p)) for p in asked["allow_patterns"]]
    ignore = [re.compile(fnmatch.translate(p)) for p in asked["ignore_patterns"]]
    return sorted(f for f in files if any(p.match(f) for p in allow) and not any(p.match(f) for p in ignore))


def weights(files: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in files:
        if f.endswith((".safetensors", ".bin", ".ckpt", ".onnx", ".msgpack", ".onnx_data", ".xml")):
            out.setdefault(f.split("/")[0] if "/" in f else "<root>", []).append(f.split("/")[-1])
    return out


WEIGHTS = {"text_encoder": "model{}.safetensors", "unet": "diffusion_pytorch_model{}.safetensors",
           "vae": "diffusion_pytorch_model{}.safetensors"}
REPOS = {
    "sd15": (sd15_files, SD15_INDEX, WEIGHTS),
    # SDXL: the second text encoder too; and not a component, the one file of the repo's second VAE folder,
    # which diffusers' choice keeps
    "sdxl": (sdxl_files, SDXL_INDEX, {**WEIGHTS, "text_encoder_2": "model{}.safetensors",
                                      "vae_1_0": "diffusion_pytorch_model{}.safetensors"}),
}


@pytest.mark.parametrize("variant", [None, "fp16"])
@pytest.mark.parametrize("repo", sorted(REPOS))
def test_one_safetensors_per_component_and_nothing_else(monkeypatch, tmp_path, repo, variant):
    files, index, expected = REPOS[repo]
    got = chosen(monkeypatch, tmp_path, files(), index, variant)
    infix = ".fp16" if variant else ""
    assert weights(got) == {folder: [name.format(infix)] for folder, name in expected.items()}
    assert not any(f.startswith(("safety_checker/", "feature_extractor/")) for f in got)
    assert {"tokenizer/vocab.json", "scheduler/scheduler_config.json", "unet/config.json"} <= set(got)


def test_a_timeout_is_retried_with_backoff_and_a_missing_repo_is_invalid_input():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("hub unreachable") from httpx.ConnectTimeout("timed out")
        return "/snapshot"

    assert hub.with_backoff(flaky, "acme/model", attempts=4, delay_s=0) == "/snapshot" and len(calls) == 3
    with pytest.raises(ModelUnavailableError, match="after 2 tries"):
        hub.with_backoff(lambda: (_ for _ in ()).throw(httpx.ReadTimeout("slow")), "acme/model", 2, 0)
    calls.clear()

    def missing():
        calls.append(1)
        response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/acme/absent"))
        raise OSError("Cannot load model acme/absent") from RepositoryNotFoundError("404", response=response)

    with pytest.raises(ModelLayoutError, match="could not be fetched"):
        hub.with_backoff(missing, "acme/absent", attempts=4, delay_s=0)
    assert len(calls) == 1  # not retried
