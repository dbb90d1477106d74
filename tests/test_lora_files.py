"""LoRA files load in diffusers unchanged (both layouts), and then draw what tinv's trained model draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from tinv.evaluation.sampling import SampleRequest, sample
from tinv.families.model import load_base_model
from tinv.files.formats import DIFFUSERS_NAME, LORA_NAME, embedding_files, lora_files, read_lora
from tinv.files.outputs import learned_files
from tinv.files.webui import lora_path
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts

PROMPT = "a photo of a {} on a table"
prefixes = {("sd1", False): (), ("sdxl", False): (), ("sd1", True): ("lora_te_",),
            ("sdxl", True): ("lora_te1_", "lora_te2_")}


def trained_concepts(model, images, text: bool = False):
    specs = [ConceptSpec("piv", ("x",), initializer_token="toy", method="pivotal", lora_rank=2),
             ConceptSpec("sks", ("x",), placeholder_token="sks", method="lora")]
    cfg = TrainConfig(steps=8, concepts_per_actor=2, batch_size=2, learning_rate=0.05, lora_learning_rate=0.05,
                      lora_text_encoder=text)
    return {t.spec.concept_id: t for t in train_concepts(model, [ConceptData(s, images) for s in specs], cfg)}


def theirs(model_dir, folder, t, file: str | None, steps: int = 3) -> np.ndarray:
    """What a diffusers user draws with the concept's files: the embedding (pivotal), then the LoRA."""
    pipe = DiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    token = t.spec.placeholder_token
    if t.vectors is not None:
        state = load_file(folder / DIFFUSERS_NAME)
        if len(t.vectors) == 1:
            pipe.load_textual_inversion(state)
        else:
            for key, tok, enc in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                  ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
                pipe.load_textual_inversion(state[key], token=token, tokenizer=tok, text_encoder=enc)
    if file == LORA_NAME:
        pipe.load_lora_weights(str(folder))
    elif file is not None:  # diffusers wants every key to be a LoRA's: a bundled embedding is A1111's to read
        pipe.load_lora_weights({k: v for k, v in load_file(folder / file).items() if not k.startswith("bundle_emb.")})
    image = pipe(PROMPT.format(token), num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(7)).images[0]
    return (image * 255).round()


@pytest.mark.parametrize("kind,text", [("sd1", False), ("sdxl", False), ("sd1", True), ("sdxl", True)])
def test_both_lora_layouts_load_in_diffusers_and_draw_what_the_trained_model_draws(tiny_models, images, tmp_path,
                                                                                   kind, text):
    """``text``: the LoRA covers the text encoders too (``lora_text_encoder``), in kohya's ``lora_te`` names."""
    model = load_base_model(str(tiny_models[kind]))
    for cid, t in trained_concepts(model, images, text).items():
        assert (t.text_lora is not None) == text
        folder = tmp_path / cid
        folder.mkdir()
        files = lora_files(model.family, cid, t.spec.placeholder_token, cid, t.spec.method, t.lora_rank, t.lora,
                           t.vectors, {"base_model_fingerprint": "fp"}, t.text_lora)
        if t.vectors is not None:
            files |= embedding_files(model.family, cid, t.spec.placeholder_token, cid, t.vectors, {})
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        with safe_open(folder / lora_path(cid), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["method"] == t.spec.method and meta["lora_rank"] == str(t.lora_rank)
        assert meta["base_model_fingerprint"] == "fp" and meta["token"] == t.spec.placeholder_token
        assert meta["trigger"] == cid
        assert keys and all(k.startswith(("lora_unet_", "bundle_emb.", *prefixes[kind, text])) for k in keys)
        for prefix in prefixes[kind, text]:  # kohya's names for the text encoders' layers
            assert any(k.startswith(prefix + "text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
        assert any(k.endswith(".alpha") for k in keys) and any(".lora_down." in k for k in keys)
        bundled = [k for k in keys if k.startswith("bundle_emb.")]
        if t.vectors is None:
            assert bundled == []
        else:  # AUTOMATIC1111's bundled embedding: the token's vectors under its name
            keys = ["string_to_param.*"] if kind == "sd1" else ["clip_l", "clip_g"]
            state = load_file(folder / lora_path(cid))
            for key, vectors in zip(keys, t.vectors):
                assert torch.equal(state[f"bundle_emb.{cid}.{key}"], vectors)
            assert len(bundled) == len(keys)

        for name in (LORA_NAME, lora_path(cid)):  # read back as the evaluate job reads a LoRA file
            read = read_lora((folder / name).read_bytes(), model)
            assert read.state.keys() == t.lora.keys() and all(torch.allclose(read.state[k], t.lora[k]) for k in t.lora)
            assert (read.text is None) == (not text)
            for mine, back in zip(t.text_lora or [], read.text or []):  # named as this model's encoders name them
                assert back.keys() == mine.keys() and all(torch.allclose(back[k], mine[k]) for k in mine)
        ours = sample(model, [t.vectors], [SampleRequest(0, PROMPT, 7)], steps=3, guidance=5.0,
                      words=[t.spec.placeholder_token], loras=[t.lora], text_loras=[t.text_lora])[0].astype(float)
        if text:  # the text encoders' part draws its share: without it the picture is another
            unet_only = sample(model, [t.vectors], [SampleRequest(0, PROMPT, 7)], steps=3, guidance=5.0,
                               words=[t.spec.placeholder_token], loras=[t.lora])[0].astype(float)
            assert np.abs(unet_only - ours).max() > 8, cid
        base = theirs(tiny_models[kind], folder, t, None)
        assert np.abs(ours - base).max() > 8, cid  # the LoRA changes the drawing
        for file in (LORA_NAME, lora_path(cid)):
            drawn = theirs(tiny_models[kind], folder, t, file)
            assert np.abs(drawn - ours).max() <= 2, (cid, file)


@pytest.mark.parametrize("kind,version,v2", [("sd1", "sd_v1", "False"), ("sd2", "sd_v2_v", "True"),
                                             ("sdxl", "sdxl_base_v1-0", "False")])
def test_every_file_names_its_model_family_as_kohya_and_the_model_spec_do(tiny_models, images, kind, version, v2):
    """AUTOMATIC1111 lists a LoRA under a model family only from ``ss_base_model_version`` and ``ss_v2``: without
    them an SDXL LoRA counts as SD 1 and is hidden from its Lora page while an SDXL model is loaded."""
    model = load_base_model(str(tiny_models[kind]))
    t = trained_concepts(model, images)["piv"]
    files = learned_files(t, model.family, model.info)
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
    for name, kind_of_file in ((lora_path("piv"), "lora"), (LORA_NAME, "lora"), (DIFFUSERS_NAME, "textual-inversion")):
        meta = safe_open_metadata(files[name])
        assert (meta["ss_base_model_version"], meta["ss_v2"]) == (version, v2), name
        assert meta["modelspec.architecture"] == f"{arch[kind]}/{kind_of_file}", name
        assert meta["family"] == model.family.version(model) and meta["base_model_fingerprint"] == model.fingerprint


def safe_open_metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's string metadata, read from its header."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]
