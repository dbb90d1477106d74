"""FLUX.1 through the family seam, on tiny [dev] and [schnell] models built from configs and loaded as users load
theirs: every method, packing, the frozen base, the objective, and files that diffusers loads drawing what the
trained model draws."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import snapshot

from jobs.eval_actor import EmbeddingMisfitError, check_fits
from tinv.evaluation.sampling import SampleConfig, SampleRequest, pipeline, sample
from tinv.families import family_of
from tinv.families.flux import FLUX, PARKED, TRAIN_GUIDANCE, TRANSFORMER_LORA_TARGETS
from tinv.families.model import assemble, load_base_model
from tinv.files.formats import DIFFUSERS_NAME, LORA_NAME, read_lora
from tinv.files.outputs import learned_files
from tinv.files.webui import embedding_path, lora_path
from tinv.manifest import ConceptSpec
from tinv.plan import resolve
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.splice import register_slot_tokens, slot_token_names
from tinv.training.trainer import PackedTrainer

PROMPT = "a photo of a {} on a table"


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, tuple(f"/x/{i}.png" for i in range(4)), initializer_token="cat", **kw)


def test_a_flux_folder_is_read_as_flux_with_its_own_sampling_and_t5_table_never_shrinks(flux_models, tiny_models):
    dev, schnell = (load_base_model(str(flux_models[k])) for k in ("flux-dev", "flux-schnell"))
    assert family_of(flux_models["flux-dev"], "x").name == "flux" and family_of(tiny_models["sd1"], "x").name == "sd"
    assert (dev.family.version(dev), schnell.family.version(schnell)) == ("flux-dev", "flux-schnell")
    assert dev.resolution == 32 and dev.family.pixel_multiple(dev) == 4  # the VAE's 2x and the 2x2 packing
    assert dev.text_encoders[1].dtype == dev.dtype and dev.text_encoders[0].dtype == torch.float32
    drawn = {m.family.version(m): SampleConfig().drawing(m) for m in (dev, schnell)}
    assert (drawn["flux-dev"]["steps"], drawn["flux-dev"]["guidance"]) == (28, 3.5)  # FluxPipeline's defaults
    assert (drawn["flux-schnell"]["steps"], drawn["flux-schnell"]["guidance"]) == (4, 0.0)
    assert type(pipeline(dev).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    t5, table = dev.tokenizers[1], dev.text_encoders[1].get_input_embeddings()
    rows, tokens = table.num_embeddings, len(t5)
    assert tokens < rows  # padded past its tokenizer, as T5's 32 128 rows for 32 100 tokens
    ids = register_slot_tokens(dev, slot_token_names(2, 2))
    assert dev.text_encoders[1].get_input_embeddings().num_embeddings == rows  # never resized
    assert min(i for row in ids[1] for i in row) >= rows  # slot tokens land after the table, read from the slots


def test_t5_waits_off_the_accelerator_from_loading_on(flux_models):
    path = flux_models["flux-dev"]
    parts = FLUX.load(path, lambda cls, part, **kw: cls.from_pretrained(path / part, **kw), torch.float32,
                      torch.float32)
    model = assemble("x", path, FLUX, parts, torch.device("meta"), torch.float32, "f")  # "meta": the accelerator
    clip, t5 = model.text_encoders
    assert (model.denoiser.device.type, model.vae.device.type, clip.device.type) == ("meta",) * 3
    assert t5.device == PARKED  # never on the accelerator before it encodes (9.5 GB for FLUX.1's)


def test_sample_draws_at_the_familys_steps_and_guidance_unless_told(flux_models):
    seen = []

    def pipe(**kw):  # records what the pipeline is asked for; draws nothing
        seen.append((kw["num_inference_steps"], kw["guidance_scale"]))
        return type("Out", (), {"images": np.zeros((len(kw["generator"]), 32, 32, 3))})()

    for kind in ("flux-dev", "flux-schnell"):
        model = load_base_model(str(flux_models[kind]))
        sample(model, [None], [SampleRequest(0, "a {}", 0)], words=["cat"], pipe=pipe)
        sample(model, [None], [SampleRequest(0, "a {}", 0)], words=["cat"], pipe=pipe, steps=2, guidance=0.0)
    assert seen == [(28, 3.5), (2, 0.0), (4, 0.0), (2, 0.0)]  # [dev] FluxPipeline's defaults, [schnell] its card's


def test_the_objective_is_rectified_flow_at_the_scripts_timesteps_and_guidance(flux_models):
    model = load_base_model(str(flux_models["flux-dev"]))
    family, scheduler = model.family, model.scheduler
    t = family.timesteps(model, 64, torch.Generator().manual_seed(3), 0.0, 1.0)
    u = compute_density_for_timestep_sampling("none", 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, scheduler.timesteps[(u * 1000).long()].float())  # diffusers' FLUX scripts' draw
    x, eps = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    noisy, target = family.noisy_and_target(model, x, eps, torch.tensor([250.0, 1000.0]))
    torch.testing.assert_close(noisy[0], 0.75 * x[0] + 0.25 * eps[0])
    torch.testing.assert_close(noisy[1], eps[1])
    torch.testing.assert_close(target, eps - x)  # the velocity
    seen = {}
    model.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = family.encode(model, model.tokenize(["a photo of a cat", "a cat"]), (16, 16))
    pred = family.predict(model, noisy, torch.tensor([250.0, 1000.0]), cond)
    assert pred.shape == x.shape  # unpacked back to the latents' shape
    assert seen["hidden_states"].shape == (2, 16, 64)  # packed 2x2: 4x4 patches of 16 x 4 channels
    assert torch.equal(seen["guidance"], torch.full((2,), TRAIN_GUIDANCE))
    assert torch.equal(seen["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", model.dtype))
    assert seen["encoder_hidden_states"].shape[1] == model.tokenizers[1].model_max_length  # T5's states


def test_every_method_packed_equals_solo_and_the_base_stays_bit_identical(flux_models, images):
    model = load_base_model(str(flux_models["flux-dev"]))
    before = snapshot(model)
    specs = [spec("a", method="lora", placeholder_token="sks", steps=4, seed=1),
             spec("b", method="pivotal", steps=5, seed=2, train_t5=True),  # vectors in CLIP-L and T5
             spec("c", steps=3, seed=3),
             spec("d", method="pivotal", steps=4, seed=4, num_vectors=2)]  # refills the slot "c" leaves
    data = {s.concept_id: ConceptData(s, images) for s in specs}
    cfg = TrainConfig(concepts_per_actor=3, batch_size=2, learning_rate=5e-2, lora_learning_rate=1e-2,
                      lora_text_encoder=True)
    packed = {o.spec.concept_id: o for o in train_concepts(model, data.values(), cfg)}
    for s in specs:
        solo = next(train_concepts(model, [data[s.concept_id]], replace(cfg, concepts_per_actor=1)))
        p = packed[s.concept_id]
        assert p.error is None and len(p.losses) == s.steps
        torch.testing.assert_close(torch.tensor(p.losses), torch.tensor(solo.losses), rtol=1e-4, atol=1e-5)
        held = {"a": None, "b": 2, "c": 1, "d": 1}[s.concept_id]  # CLIP-L's vectors, and T5's where asked
        assert (p.vectors is None) == (held is None) and (held is None or len(p.vectors) == held)
        for mine, alone in zip(p.vectors or [], solo.vectors or []):
            torch.testing.assert_close(mine, alone, rtol=0, atol=1e-5)
        if p.lora is not None:
            assert {k.split(".lora_")[0].split(".", 2)[-1] for k in p.lora} <= set(TRANSFORMER_LORA_TARGETS)
            assert len(p.text_lora) == 1  # CLIP-L alone, as the FLUX scripts' --train_text_encoder
            for mine, alone in zip([p.lora, *p.text_lora], [solo.lora, *solo.text_lora]):
                diffs = torch.cat([(mine[k] - alone[k]).abs().flatten() for k in mine])
                assert diffs.max() <= 1e-4 and diffs.mean() <= 1e-6, (s.concept_id, diffs.max())
    t5_init = model.text_encoders[1].get_input_embeddings().weight[model.tokenizers[1].convert_tokens_to_ids("▁cat")]
    assert (packed["b"].vectors[1] - t5_init).abs().max() > 1e-3  # T5's vector learned
    assert resolve(specs[1], cfg).train_t5 and not resolve(specs[2], cfg).train_t5
    assert packed["b"].training["train_t5"] is True and "train_t5" not in packed["c"].training
    after = snapshot(model)
    assert [k for k in before if k in after and not torch.equal(before[k], after[k])] == []
    frozen = [(n, p) for m in [model.denoiser, model.vae, *model.text_encoders] for n, p in m.named_parameters()]
    assert all(not p.requires_grad for n, p in frozen if ".lora_" not in n)  # the slots' adapters stay in place


def test_files_load_in_diffusers_and_draw_what_the_trained_model_draws(flux_models, images, tmp_path):
    model = load_base_model(str(flux_models["flux-dev"]))
    specs = [spec("piv", method="pivotal", lora_rank=2, train_t5=True), spec("tix", placeholder_token="<tix>")]
    cfg = TrainConfig(steps=6, concepts_per_actor=2, batch_size=2, learning_rate=0.1, lora_learning_rate=0.05)
    trained = {t.spec.concept_id: t for t in train_concepts(model, [ConceptData(s, images) for s in specs], cfg)}
    for cid, t in trained.items():
        files = learned_files(t, model.family, model.info)
        for name, data in files.items():
            (tmp_path / cid / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / cid / name).write_bytes(data)
        embeds = load_file(tmp_path / cid / DIFFUSERS_NAME)
        assert set(embeds) == ({"clip_l", "t5xxl"} if cid == "piv" else {"clip_l"})  # ComfyUI's keys
        assert load_file(tmp_path / cid / embedding_path(cid)).keys() == embeds.keys()
        with safe_open(tmp_path / cid / DIFFUSERS_NAME, "pt") as f:
            meta = f.metadata()
        arch = ("flux1", "flux-1-dev/textual-inversion")
        assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == arch
        assert meta["family"] == "flux-dev" and meta["base_model_fingerprint"] == model.fingerprint
        token = t.spec.placeholder_token
        ours = sample(model, [t.vectors], [SampleRequest(0, PROMPT, 7)], steps=3, guidance=3.5, words=[token],
                      loras=[t.lora])[0].astype(float)
        pipe = FluxPipeline.from_pretrained(flux_models["flux-dev"])
        pipe.set_progress_bar_config(disable=True)
        # the two-call form: CLIP-L's rows, and T5's where they trained
        pipe.load_textual_inversion(embeds["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        if "t5xxl" in embeds:
            pipe.load_textual_inversion(embeds["t5xxl"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        if t.lora is not None:
            with safe_open(tmp_path / cid / LORA_NAME, "pt") as f:
                meta = f.metadata()
            assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("flux1", "flux-1-dev/lora")
            base = draw(pipe, token)
            pipe.load_lora_weights(str(tmp_path / cid))
            assert np.abs(draw(pipe, token) - base).max() > 8  # the LoRA changes the drawing
            for name in (LORA_NAME, lora_path(cid)):  # read back as the evaluate job reads a LoRA file
                read = read_lora((tmp_path / cid / name).read_bytes(), model)
                assert read.state.keys() == t.lora.keys()
                assert all(torch.allclose(read.state[k], t.lora[k]) for k in t.lora)
        assert np.abs(draw(pipe, token) - ours).max() <= 2, cid


def draw(pipe: FluxPipeline, token: str) -> np.ndarray:
    image = pipe(PROMPT.format(token), num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
                 max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(7)).images[0]
    return (image * 255).round()


def test_an_embedding_of_another_family_is_refused_with_its_shapes(flux_models, tiny_models):
    flux = load_base_model(str(flux_models["flux-dev"]))
    with pytest.raises(EmbeddingMisfitError, match="do not fit"):  # SDXL's clip_l + clip_g on FLUX's CLIP-L + T5
        check_fits(flux, [torch.zeros(1, 32), torch.zeros(1, 64)], "sdxl.safetensors")
    check_fits(flux, [torch.zeros(1, 32)], "clip_l-only.safetensors")  # CLIP-L's alone fit
    sdxl = load_base_model(str(tiny_models["sdxl"]))
    with pytest.raises(ValueError, match="transformer"):
        sdxl.family.read_lora({"transformer.x.lora_A.weight": torch.zeros(2, 4),
                               "transformer.x.lora_B.weight": torch.zeros(4, 2)}, sdxl)
    assert flux.info["family"] == "flux-dev" and flux.info["ss_base_model_version"] == "flux1"  # every file's


def test_t5_encodes_a_concepts_prompts_once_then_leaves_unless_t5_vectors_train(flux_models, images, monkeypatch):
    import tinv.families.flux as flux

    model = load_base_model(str(flux_models["flux-dev"]))
    t5, places, calls = model.text_encoders[1], [], []
    monkeypatch.setattr(flux, "PARKED", "host")  # a place of its own (this CPU is both)
    monkeypatch.setattr(flux, "place", lambda encoder, device: encoder is t5 and places.append(device))
    t5.register_forward_hook(lambda *a: calls.append(1))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=2, batch_size=2, caption_dropout=0.5))
    trainer.admit(0, ConceptData(spec("c", method="pivotal"), images))
    templates = len(model.templates["object"])
    assert len(calls) == -(-(templates + 1) // flux.FILL_BATCH) and places[-1] == "host"  # its prompts and ""
    calls.clear()
    for _ in range(3):
        trainer.step()
    assert calls == []  # every step's T5 states come from the cache
    trainer.admit(1, ConceptData(spec("t", method="pivotal", train_t5=True), images))
    assert places[-1] == model.device  # kept where its T5 vectors train
    calls.clear()
    for _ in range(4):
        trainer.step()
    assert 1 <= len(calls) <= 4  # rows with T5 vectors (not dropped captions), encoded live for their gradient
    calls.clear()
    requests = [SampleRequest(0, prompt, seed) for prompt in ("a {}", "a photo of a {}") for seed in (1, 2)]
    sample(model, [[torch.zeros(1, model.embedding_dims[0])]], requests, steps=1, guidance=3.5, batch_size=2,
           words=["c"])
    assert len(calls) == 1 and places[-1] == "host"  # every prompt (and "") encoded at once, none per batch
