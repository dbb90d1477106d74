"""The toy world's held-out concepts, their training pictures and how a sample is judged."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lab.toyworld.world import (
    BACKDROP_WORD,
    COLOURS,
    COMBINATIONS,
    CONTRAST,
    HELD_OUT_STYLES,
    LIGHT,
    NAMED_COLOURS,
    SHAPES,
    STYLE_PROMPT,
    UNNAMED_CONCEPTS,
    Item,
    render,
)


@dataclass(frozen=True)
class Concept:
    """A concept Textual Inversion should learn from pictures alone."""

    name: str
    kind: str
    """``combination``, ``unnamed`` or ``style``."""
    shape: str | None = None
    colour: str | None = None
    backdrop: str = LIGHT
    """A style concept's unnamed backdrop."""
    rendering: str = "plain"
    """How every training picture is drawn (a style of :data:`~lab.toyworld.world.STYLES`)."""
    rgb: tuple[int, int, int] | None = None
    """A described colour's exact fill (an object whose ``colour`` is ``other``)."""
    backdrop_rgb: tuple[int, int, int] | None = None
    """A described backdrop's exact tone (a style whose ``backdrop`` is ``other``)."""

    @property
    def initializer(self) -> str:
        """The coarse word a user would give: the shape for objects, the backdrop word ("toned") for styles."""
        return self.shape or BACKDROP_WORD

    @property
    def learnable_property(self) -> str:
        return "style" if self.kind == "style" else "object"

    def items(self, n: int, rng: np.random.Generator) -> list[Item]:
        """``n`` labelled pictures of the concept (styles: any named colour and shape on the backdrop)."""
        if self.kind != "style":
            return [Item(self.shape, self.colour, self.rendering, self.rgb) for _ in range(n)]
        colours = list(NAMED_COLOURS)
        if self.backdrop_rgb is not None:  # a described backdrop: the named colours that stand out on it
            colours = [c for c in colours if np.linalg.norm(np.subtract(COLOURS[c], self.backdrop_rgb)) >= CONTRAST]
        return [
            Item(SHAPES[i % len(SHAPES)], colours[rng.integers(len(colours))], self.rendering, backdrop=self.backdrop,
                 backdrop_rgb=self.backdrop_rgb)
            for i in range(n)
        ]

    def pictures(self, n: int, seed: int) -> list[Image.Image]:
        rng = np.random.default_rng(seed)
        return [render(it, rng) for it in self.items(n, rng)]

    def captions(self, n: int, seed: int) -> tuple[str, ...]:
        """Styles: each of :meth:`pictures`' content in words (``a {} star``), so that the style's token
        need not carry the shapes; objects: none (their pictures are all the concept)."""
        if self.kind != "style":
            return ()
        return tuple(STYLE_PROMPT.format("{}", shape=it.shape) for it in self.items(n, np.random.default_rng(seed)))

    def hit(self, item: Item, shape: str | None = None, loose: bool = False) -> bool:
        """Does a sample show everything the concept's pictures share: shape, colour and rendering for an
        object; backdrop and rendering for a style, which must also show the shape its prompt named?

        ``loose`` is the earlier judgement, which ignored the rendering (what every figure recorded before
        2026-12-01 used)."""
        drawn_alike = loose or item.style == self.rendering
        if self.kind == "style":
            return item.backdrop == self.backdrop and item.shape == shape and drawn_alike
        return item.shape == self.shape and item.colour == self.colour and drawn_alike


CONCEPTS: tuple[Concept, ...] = (
    *(Concept(f"{c}-{s}", "combination", s, c) for c, s in COMBINATIONS),
    *(Concept(f"{c}-{s}", "unnamed", s, c) for c, s in UNNAMED_CONCEPTS),
    *(Concept(st, "style", backdrop=st) for st in HELD_OUT_STYLES),
)
