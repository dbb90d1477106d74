"""Probe: does holding the empty prompt on the class pictures too take `lora`'s style drift away?

`--blank-prompt-preservation` keeps the empty prompt's prediction the frozen model's on a concept's own noisy
samples (ai-toolkit's Blank Prompt Preservation). Beside class pictures (`--prior-preservation images`) this
probe adds a second such set on the class pictures' noisy samples, so both branches that classifier-free
guidance combines (the class prompt, against the noise; the empty prompt, against the frozen model) are held
where generation from noise goes. It patches :meth:`tinv.trainer.PackedTrainer._draw` for this process only
and then runs ``python -m tinv.toyworld`` with the arguments given (the product does not hold it: measured,
it did not help; ``tinv/toyworld/README.md``, "Output preservation"). Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/toyworld/blank_on_class.py methods --runs lora+prior \\
        --lora-text-encoder --lora-text-encoder-learning-rate 3e-3 --prior-preservation images \\
        --blank-prompt-preservation --samples 384 --json out.json
"""

from __future__ import annotations

import sys

from tinv.draws import preserved
from tinv.toyworld.__main__ import main
from tinv.trainer import PackedTrainer

own_draw = PackedTrainer._draw


def draw_with_class_blank(self: PackedTrainer, slot, generator, n):  # type: ignore[no-untyped-def]
    """The trainer's draw, then (blank preservation beside class pictures) the class pictures' samples again
    under the empty prompt, against the frozen model's prediction, weighed as a blank set of its own."""
    rows = own_draw(self, slot, generator, n)
    if slot.settings.blank_prompt_preservation and slot.class_latents is not None:
        rows.append(preserved(rows[1], [e[None] for e in self.empty_ids], generator, blank=True))
    return rows


if __name__ == "__main__":
    PackedTrainer._draw = draw_with_class_blank  # type: ignore[method-assign]
    main(sys.argv[1:])
