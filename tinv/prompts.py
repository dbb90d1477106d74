"""Prompt templates for Textual Inversion training and evaluation.

The training templates are the small ImageNet template sets used by the Textual Inversion
paper (Gal et al. 2022, arXiv 2208.01618) and diffusers' ``textual_inversion`` example.
``{}`` stands for the placeholder token.
"""

from __future__ import annotations

import re

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES: dict[str, tuple[str, ...]] = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

EVAL_PROMPTS: dict[str, tuple[str, ...]] = {
    "object": ("a photo of a {}", "a painting of a {}", "a {} on a table", "a close-up photo of a {}"),
    "style": ("a painting in the style of {}", "a cat in the style of {}", "a house in the style of {}"),
}


def template_words() -> set[str]:
    """Every word used by the templates (for building a tokenizer that knows them)."""
    text = " ".join(t.format("") for group in (TEMPLATES, EVAL_PROMPTS) for ts in group.values() for t in ts)
    return set(re.findall(r"[a-z]+", text))
