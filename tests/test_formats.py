"""Embedding files load in diffusers unchanged, and the token then means what we trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from tinv.families.model import load_base_model
from tinv.files.formats import DIFFUSERS_NAME, embedding_files
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.splice import spliced
from tinv.training.trainer import PackedTrainer

PROMPT = "a photo of a {} on a table"


def train_and_save(model_dir: Path, out: Path, images: torch.Tensor, num_vectors: int):
    model = load_base_model(str(model_dir))
    spec = ConceptSpec("thing", ("x",), initializer_token="toy", num_vectors=num_vectors)
    cfg = TrainConfig(steps=8, concepts_per_actor=1, batch_size=2, learning_rate=0.05)
    trained = next(train_concepts(model, [ConceptData(spec, images)], cfg))
    (out / "webui" / "embeddings").mkdir(parents=True, exist_ok=True)
    for name, data in embedding_files(model.family, spec.concept_id, spec.placeholder_token, "thing", trained.vectors,
                                  model.info).items():
        (out / name).write_bytes(data)
    return model, spec, trained


def our_embeddings(model, spec, vectors) -> tuple[torch.Tensor, dict | None]:
    """The conditioning tinv trains against, for PROMPT with the learned vectors in a slot."""
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1))
    with torch.no_grad():
        for e, v in enumerate(vectors):
            trainer.vectors[0][e][: len(v)] = v
    prompt = PROMPT.format(" ".join(trainer.names[0][: spec.num_vectors]))
    ids = model.tokenize([prompt])
    with torch.no_grad(), spliced(model, trainer.vectors, trainer.token_ids):
        return model.family.encode(model, ids, (model.resolution,) * 2).tensors


@pytest.mark.parametrize("kind,num_vectors", [("sd1", 2), ("sd2", 1)])
def test_sd_embedding_loads_in_diffusers_and_the_token_works(tiny_models, images, tmp_path, kind, num_vectors):
    model, spec, trained = train_and_save(tiny_models[kind], tmp_path, images, num_vectors)
    saved = load_file(tmp_path / DIFFUSERS_NAME)
    assert list(saved) == [spec.placeholder_token]
    assert torch.equal(saved[spec.placeholder_token], trained.vectors[0])

    webui = "webui/embeddings/thing.safetensors"
    for file, kwargs in [(DIFFUSERS_NAME, {}), (webui, {"token": spec.placeholder_token})]:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_models[kind], safety_checker=None)
        pipe.load_textual_inversion(str(tmp_path / file), **kwargs)
        ids = pipe.tokenizer.convert_tokens_to_ids(spec.tokens)
        assert ids == list(range(len(pipe.tokenizer) - num_vectors, len(pipe.tokenizer)))
        table = pipe.text_encoder.get_input_embeddings().weight
        torch.testing.assert_close(table[ids], trained.vectors[0], rtol=0, atol=0)
        theirs, _ = pipe.encode_prompt(PROMPT.format(spec.placeholder_token), "cpu", 1, False)
        ours = our_embeddings(model, spec, trained.vectors)["hidden"]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        image = pipe(PROMPT.format(spec.placeholder_token), num_inference_steps=2, output_type="np").images
        assert image.shape == (1, 32, 32, 3)


def test_sdxl_embedding_loads_with_the_two_call_form_and_the_token_works(tiny_models, images, tmp_path):
    model, spec, trained = train_and_save(tiny_models["sdxl"], tmp_path, images, 2)
    for file in (DIFFUSERS_NAME, "webui/embeddings/thing.safetensors"):
        state = load_file(tmp_path / file)
        assert sorted(state) == ["clip_g", "clip_l"]
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"])
        t = spec.placeholder_token
        pipe.load_textual_inversion(state["clip_l"], token=t, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(
            state["clip_g"], token=t, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        for e, (tok, enc) in enumerate([(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]):
            ids = tok.convert_tokens_to_ids(spec.tokens)
            torch.testing.assert_close(enc.get_input_embeddings().weight[ids], trained.vectors[e], rtol=0, atol=0)
        theirs, _, pooled, _ = pipe.encode_prompt(PROMPT.format(t), device="cpu", do_classifier_free_guidance=False)
        added = our_embeddings(model, spec, trained.vectors)
        ours = added["hidden"]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # the tiny encoders carry the real end-of-text id, so diffusers pools where tinv does
        torch.testing.assert_close(pooled, added["text_embeds"], rtol=1e-5, atol=1e-5)
        image = pipe(PROMPT.format(t), num_inference_steps=2, output_type="np", height=32, width=32).images
        assert image.shape == (1, 32, 32, 3)


def test_files_carry_the_base_model_and_token_in_their_metadata(tiny_models, images, tmp_path):
    from safetensors import safe_open

    model, spec, _ = train_and_save(tiny_models["sd1"], tmp_path, images, 1)
    with safe_open(tmp_path / DIFFUSERS_NAME, "pt") as f:
        meta = f.metadata()
    assert meta["token"] == "<thing>" and meta["concept_id"] == "thing"
    assert meta["base_model_fingerprint"] == model.fingerprint and meta["base_model"] == str(tiny_models["sd1"])
