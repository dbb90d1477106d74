"""Evaluation: batches mixing concepts, embedding files of every format, CLIP metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from tinv.evaluation.evaluate import EvalConcept, Evaluator, read_embedding
from tinv.evaluation.metrics import ClipMetrics, to_uint8, without_token
from tinv.evaluation.sampling import SampleConfig
from tinv.families.model import load_base_model
from tinv.families.sd import SD
from tinv.families.sdxl import SDXL
from tinv.families.tiny import clip_tokenizer
from tinv.files.formats import diffusers_embedding, keyed

CFG = SampleConfig(samples_per_prompt=2, sample_steps=4, sample_batch_size=4)


def concepts(dims: list[int], n: int = 3) -> list[EvalConcept]:
    g = torch.Generator().manual_seed(1)
    return [
        EvalConcept(f"c{i}", f"<c{i}>", [torch.randn(1 + i % 2, d, generator=g) for d in dims],
                    prompts=("a photo of a {}", "a {} on a table")[: 1 + i % 2])
        for i in range(n)
    ]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_batch_mixing_three_concepts_equals_each_concept_alone(tiny_models, kind):
    model = load_base_model(str(tiny_models[kind]))
    evaluator = Evaluator(model, CFG)
    three = concepts(model.embedding_dims)
    mixed = evaluator.run(three)  # 10 images in batches of 4: batches hold several concepts
    for concept, got in zip(three, mixed):
        (alone,) = evaluator.run([concept])
        assert got.prompts == alone.prompts and got.seeds == alone.seeds and len(got.images) == 2 * len(concept.prompts)
        diff = np.abs(got.images.astype(int) - alone.images.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
        assert sorted(got.files()) == sorted(alone.files()) == sorted(
            ["grid.png", *(f"samples/{p:02d}_{s:02d}.png" for p in range(len(concept.prompts)) for s in range(2))]
        )
    assert not np.array_equal(mixed[0].images, mixed[1].images)  # different concepts really differ


def test_every_embedding_format_reads_to_the_same_token_and_vectors(tmp_path):
    vectors = torch.randn(2, 32)
    sdxl = [torch.randn(2, 32), torch.randn(2, 64)]
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")  # sd-concepts-library: one 1-D vector
    save_file(diffusers_embedding(SD, "<two>", [vectors]), tmp_path / "learned_embeds.safetensors")
    save_file(keyed(SD.webui_embedding_keys, [vectors]), tmp_path / "mine.safetensors")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "a1111-tok", "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "a1111.pt")
    save_file(diffusers_embedding(SDXL, "<x>", sdxl), tmp_path / "sdxl.safetensors")

    token, got = read_embedding(str(tmp_path / "learned_embeds.bin"))
    assert token == "<cat-toy>" and len(got) == 1 and torch.equal(got[0], vectors[:1])
    token, got = read_embedding("file://" + str(tmp_path / "learned_embeds.safetensors"))
    assert token == "<two>" and torch.equal(got[0], vectors)
    token, got = read_embedding(str(tmp_path / "mine.safetensors"))
    assert token == "<mine>" and torch.equal(got[0], vectors)
    token, got = read_embedding(str(tmp_path / "a1111.pt"))
    assert token == "a1111-tok" and torch.equal(got[0], vectors)
    token, got = read_embedding(str(tmp_path / "a1111.pt"), token="<renamed>")
    assert token == "<renamed>"
    token, got = read_embedding(str(tmp_path / "sdxl.safetensors"), token="<x>")
    assert token == "<x>" and [g.shape for g in got] == [(2, 32), (2, 64)] and torch.equal(got[1], sdxl[1])


def test_files_of_each_format_draw_the_same_images(tiny_models, tmp_path):
    model = load_base_model(str(tiny_models["sd1"]))
    vector = torch.randn(1, model.embedding_dims[0], generator=torch.Generator().manual_seed(3))
    torch.save({"<cat-toy>": vector[0]}, tmp_path / "learned_embeds.bin")
    torch.save({"string_to_param": {"*": vector}, "name": "cat-toy"}, tmp_path / "cat-toy.pt")
    evaluator = Evaluator(model, CFG)
    drawn = []
    for name in ("learned_embeds.bin", "cat-toy.pt"):
        token, vectors = read_embedding(str(tmp_path / name))
        drawn.append(evaluator.run([EvalConcept("cat-toy", token, vectors, prompts=("a photo of a {}",))])[0].images)
    reference = evaluator.run([EvalConcept("cat-toy", "<cat-toy>", [vector], prompts=("a photo of a {}",))])[0]
    assert all(np.array_equal(d, reference.images) for d in drawn)


def tiny_clip(path) -> str:
    """A random CLIP model and processor saved to ``path`` (the metrics' code path, no download)."""
    torch.manual_seed(0)
    tok = clip_tokenizer(["a", "photo", "of", "on", "table", "the"])
    tok.model_max_length = 32
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(processor, tok).save_pretrained(path)
    return str(path)


def test_clip_metrics_are_the_papers_two_similarities(tiny_models, tmp_path, images):
    clip = ClipMetrics(tiny_clip(tmp_path / "clip"))
    model = load_base_model(str(tiny_models["sd1"]))
    (concept,) = concepts(model.embedding_dims, 1)
    concept.training = images
    plain = Evaluator(model, CFG).run([concept])[0]
    assert all("clip_image" not in row and "clip_text" not in row for row in plain.per_image)  # none invented
    (got,) = Evaluator(model, CFG, [clip]).run([concept])
    sample_f = clip.image_features(got.images)
    train_f = clip.image_features(to_uint8(images))
    text_f = clip.text_features([without_token(p) for p in got.prompts])
    for i, row in enumerate(got.per_image):
        assert row["clip_image"] == pytest.approx(float((sample_f[i] @ train_f.T).mean()), abs=1e-5)
        assert row["clip_text"] == pytest.approx(float(sample_f[i] @ text_f[i]), abs=1e-5)
    assert got.summary["clip_text"] == pytest.approx(np.mean([r["clip_text"] for r in got.per_image]))
    assert without_token("a {} on a table") == "a on a table"


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_half_precision_unet_with_fp32_text_encoders_trains_and_draws(tiny_models, images, kind):
    from tinv.manifest import ConceptSpec
    from tinv.settings import TrainConfig
    from tinv.training.concept import ConceptData
    from tinv.training.loop import train_concepts

    model = load_base_model(str(tiny_models[kind]), precision="bf16")
    assert model.denoiser.dtype == torch.bfloat16 and {te.dtype for te in model.text_encoders} == {torch.float32}
    spec = ConceptSpec("c", ("x",), initializer_token="cat")
    (trained,) = train_concepts(model, [ConceptData(spec, images)], TrainConfig(steps=2, batch_size=2))
    assert trained.failure is None
    (drawn,) = Evaluator(model, CFG).run([EvalConcept("c", "<c>", trained.vectors, prompts=("a photo of a {}",))])
    assert drawn.images.shape == (2, 32, 32, 3) and drawn.images.std() > 0


def test_loras_with_text_encoder_parts_draw_as_alone_in_a_mixed_batch(tiny_models, images):
    from tinv.manifest import ConceptSpec
    from tinv.settings import TrainConfig
    from tinv.training.concept import ConceptData
    from tinv.training.loop import train_concepts

    model = load_base_model(str(tiny_models["sd1"]))
    cfg = TrainConfig(steps=4, concepts_per_actor=2, batch_size=2, lora_learning_rate=0.05, lora_text_encoder=True)
    specs = [ConceptSpec(w, ("x",), placeholder_token=f"{w} toy", method="lora", seed=i)
             for i, w in enumerate(("sks", "zwx"))]
    trained = list(train_concepts(model, [ConceptData(s, images) for s in specs], cfg))
    drawn = [EvalConcept(t.spec.concept_id, t.spec.placeholder_token, None, prompts=("a photo of a {}",), lora=t.lora,
                         text_lora=t.text_lora) for t in trained]
    evaluator = Evaluator(model, SampleConfig(samples_per_prompt=2, sample_steps=4, sample_batch_size=4))
    mixed = evaluator.run(drawn)  # one batch of both concepts' samples
    for concept, got in zip(drawn, mixed):
        (alone,) = evaluator.run([concept])
        assert np.abs(got.images.astype(int) - alone.images.astype(int)).max() <= 2
        (unet_only,) = evaluator.run([EvalConcept(concept.concept_id, concept.token, None, prompts=concept.prompts,
                                                  lora=concept.lora)])
        assert np.abs(got.images.astype(int) - unet_only.images.astype(int)).max() > 8  # its text part is drawn
