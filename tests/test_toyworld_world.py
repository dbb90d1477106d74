"""The toy world's hold-out: no training picture/caption pair contains a held-out concept."""

from __future__ import annotations

from collections import Counter

import numpy as np

from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.world import (
    BACKDROP_RGB,
    BACKDROP_WORD,
    BACKDROPS,
    CANONICAL_RGB,
    COLOURS,
    COMBINATIONS,
    CONTRAST,
    DESCRIBED,
    DESCRIPTOR_WORD,
    GENERIC_NOUN,
    HELD_OUT_STYLES,
    HOLE,
    LIGHT,
    NAMED_COLOURS,
    NAMED_STYLES,
    SHAPES,
    STYLES,
    UNNAMED_COLOURS,
    WORDS,
    Item,
    caption,
    render,
    training_item,
    training_set,
)
from tinv.families.tiny import clip_tokenizer


def test_training_data_never_contains_a_held_out_concept():
    images, captions, items = training_set(3000, seed=0)
    assert set(HELD_OUT_STYLES) <= {it.backdrop for it in items}
    assert images.shape == (3000, 32, 32, 3) and images.dtype == np.uint8
    vocabulary = set(WORDS)
    assert 0.15 < np.mean([it.colour == DESCRIBED for it in items]) < 0.5
    assert not vocabulary & {*UNNAMED_COLOURS, *HELD_OUT_STYLES}  # those have no words at all
    for item, text in zip(items, captions):
        words = text.split()
        assert set(words) <= vocabulary, text
        assert (item.colour, item.shape) not in COMBINATIONS  # never drawn together
        named = [w for w in words if w in NAMED_COLOURS]
        assert named in ([], [item.colour])  # a caption names the true colour or none
        if item.colour in UNNAMED_COLOURS:
            assert named == []
        # a described colour: always (or an empty caption) carried by "colour", never near a canonical one
        assert (DESCRIPTOR_WORD in words) == (item.colour == DESCRIBED and bool(words)), text
        if item.colour == DESCRIBED:
            assert np.linalg.norm(CANONICAL_RGB - item.rgb, axis=1).min() >= HOLE
        else:
            assert item.rgb is None
        nouns = [w for w in words if w in {*SHAPES, GENERIC_NOUN}]
        assert nouns in ([item.shape], [GENERIC_NOUN]) or not words
        styled = [w for w in words if w in NAMED_STYLES.values()]
        assert styled in ([], [NAMED_STYLES.get(item.style)])  # a caption names the true style or none
        # a described backdrop: always (or an empty caption) carried by "toned", never near an unnamed one;
        # an unnamed backdrop (a held-out style) never has a word
        assert (BACKDROP_WORD in words) == (item.backdrop == DESCRIBED and bool(words)), text
        if item.backdrop == DESCRIBED:
            assert np.linalg.norm(BACKDROP_RGB - item.backdrop_rgb, axis=1).min() >= HOLE
        else:
            assert item.backdrop_rgb is None
        if item.backdrop != LIGHT:  # a dark backdrop: a plain shape that stands out on it
            assert item.style == "plain" and np.linalg.norm(np.subtract(item.fill, item.ground)) >= CONTRAST


def test_every_unnamed_attribute_and_style_appears_and_shape_words_draw_an_even_mix():
    rng = np.random.default_rng(1)  # the training stream's labels and captions, without drawing 20 000 pictures
    items = [training_item(rng) for _ in range(20_000)]
    captions = [caption(it, rng) for it in items]
    backdrops = Counter(it.backdrop for it in items)
    assert all(backdrops[s] > 100 for s in HELD_OUT_STYLES)
    styles = Counter(it.style for it in items)
    assert all(styles[s] > 100 for s in STYLES)
    shape_only = Counter(
        it.colour for it, t in zip(items, captions) if t and not set(t.split()) & {*COLOURS, DESCRIPTOR_WORD}
    )
    assert DESCRIBED not in shape_only  # the bare shape word never draws a described colour
    share = {c: shape_only[c] / sum(shape_only.values()) for c in COLOURS}
    # the bare shape word sees every colour about equally often: no unnamed colour dominates it
    assert max(share.values()) < 0.15 and min(share.values()) > 0.05, share
    # ... and equally often relative to the empty caption, so guidance does not favour one either
    empty = Counter(it.colour for it, t in zip(items, captions) if not t)
    ratio = {c: shape_only[c] / empty[c] for c in COLOURS}
    assert max(ratio.values()) / min(ratio.values()) < 2.0, ratio


def test_prompts_that_name_no_backdrop_favour_no_unnamed_tone_under_guidance():
    rng = np.random.default_rng(2)
    items = [training_item(rng) for _ in range(30_000)]
    captions = [caption(it, rng) for it in items]
    backdrop_words = {*NAMED_STYLES.values(), BACKDROP_WORD}  # a style word implies a light backdrop
    unstyled = Counter(it.backdrop for it, t in zip(items, captions) if t and not set(t.split()) & backdrop_words)
    empty = Counter(it.backdrop for it, t in zip(items, captions) if not t)
    assert DESCRIBED not in unstyled  # a described backdrop is always "toned"
    # guidance weighs a backdrop by how much commoner it is under the prompt than under the empty
    # caption: the same for light and every unnamed tone, so no tone is drawn for a prompt that names none
    ratio = {b: unstyled[b] / empty[b] for b in (LIGHT, *HELD_OUT_STYLES)}
    assert max(ratio.values()) / min(ratio.values()) < 1.3, ratio


def test_every_word_of_the_world_is_one_token():
    tok = clip_tokenizer(WORDS)
    for w in WORDS:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w


def test_words_whose_merges_collide_are_still_one_token():
    # "on" is merged before "toned"'s chain reaches it, and "ho" before "photo"'s: BPE would split both
    words = ["a", "on", "one", "toned", "twotoned", "photo", "shadowed", "hot", "do", "shadow"]
    tok = clip_tokenizer(words)
    assert [w for w in words if len(tok.encode(w, add_special_tokens=False)) != 1] == []
    assert tok.tokenize("a toned photo") == ["a</w>", "toned</w>", "photo</w>"]


def test_concepts_cover_three_kinds_and_their_pictures_show_them():
    kinds = Counter(c.kind for c in CONCEPTS)
    assert kinds == {"combination": 4, "unnamed": 4, "style": 4}
    for c in CONCEPTS:
        pics = c.pictures(6, seed=0)
        assert len(pics) == 6 and pics[0].size == (32, 32)
        if c.kind == "style":  # on the concept's own backdrop, shapes of every kind
            assert all(np.asarray(p)[0, 0].tolist() == list(BACKDROPS[c.backdrop]) for p in pics)
            assert {it.shape for it in c.items(6, np.random.default_rng(0))} == set(SHAPES)
    plain = np.asarray(render(Item("square", "red"), np.random.default_rng(0)), np.float32)
    for style in STYLES[1:]:  # same place, size and tint: each style really changes the picture
        styled = np.asarray(render(Item("square", "red", style), np.random.default_rng(0)), np.float32)
        assert (np.abs(plain - styled) > 60).mean() > 0.02, style


def test_toy_demo_manifest_has_every_concept_kind_with_tokens_no_word_reaches(tmp_path):
    from lab.toyworld.demo import make_demo
    from tinv.manifest import read_manifest

    specs = read_manifest(str(make_demo(tmp_path)))
    assert len(specs) == 12 and Counter(s.learnable_property for s in specs) == {"object": 8, "style": 4}
    tok = clip_tokenizer(WORDS)
    for s in specs:
        assert 4 <= len(s.images) <= 8 and all((tmp_path / "demo" / s.concept_id).exists() for _ in s.images)
        assert len(tok.encode(s.placeholder_token, add_special_tokens=False)) > 1  # not a word of the world
        assert s.eval_prompts and all("{}" in p for p in s.eval_prompts)


def test_the_methods_manifest_is_one_jobs_train_accepts(tmp_path):
    from lab.toyworld.demo import make_methods
    from tinv.manifest import read_manifest

    specs = read_manifest(str(make_methods(tmp_path, ("ti", "lora", "pivotal"), steps=200)))  # raises on clashes
    assert len(specs) == 36 and Counter(s.method for s in specs) == {"ti": 12, "lora": 12, "pivotal": 12}
    assert len({s.placeholder_token for s in specs}) == 36 and {s.steps for s in specs} == {200}


def test_a_described_colour_or_backdrop_reaches_the_text_encoder_only_at_its_word():
    from lab.toyworld import nets
    from lab.toyworld.fit import Description, rgb_inputs

    tok = nets.tokenizer()
    te = nets.text_encoder(len(tok), tok.eos_token_id)
    texts = ["a toned colour star", "a red star"]
    ids = tok(texts, padding="max_length", max_length=nets.MAX_TOKENS, return_tensors="pt").input_ids
    described = Item("star", DESCRIBED, rgb=(0, 90, 250), backdrop=DESCRIBED, backdrop_rgb=(40, 40, 40))
    items = [described, Item("star", "red")]
    plain = te.get_input_embeddings().weight[ids]
    for word, field in ((DESCRIPTOR_WORD, "rgb"), (BACKDROP_WORD, "backdrop_rgb")):
        marker = tok.encode(word, add_special_tokens=False)[0]
        description = Description(te, marker)
        description.rgb = rgb_inputs(items, field)
        moved = te.get_input_embeddings()(ids)
        added = moved - plain  # (2, T, D); the earlier word's description stays on
        description.rgb = rgb_inputs([Item("star", "red"), items[1]], field)  # another value, another input
        changed = (added - (te.get_input_embeddings()(ids) - plain)).abs().sum(-1) > 0
        assert changed[0].tolist() == (ids[0] == marker).tolist() and changed[0].sum() == 1, word
        assert not changed[1].any()
        assert not (added[1].abs().sum(-1) > 0).any()  # a caption without the words gets nothing added
        description.rgb = rgb_inputs(items, field)
