"""Trigger words, and the ``webui/`` folder whose files drop into the web UIs' model folders as they are.

AUTOMATIC1111, Forge, ComfyUI, InvokeAI and kohya's ``gen_img`` all name an embedding after its file's
stem, and A1111 and Forge list a LoRA by its stem too (``<lora:{stem}:1>``). So every concept gets one
**trigger**, the stem of its web-UI files:

- ``trigger`` in the manifest, or by default the ``concept_id`` with each ``.`` made ``-``;
- it matches :data:`TRIGGER` (letters, digits, ``-``, ``_``: a file name on every OS, and no ``.``, which
  A1111 splits a bundled embedding's key on);
- unique within the run up to case (the CLIP tokenizer lowercases, and a case-insensitive store would
  merge the files);
- never a word the base model's tokenizer already reads as one token: A1111 matches an embedding's name
  as a token sequence in every prompt, so an embedding named ``navy`` would replace the word navy in
  every prompt of that install. A default trigger that is one is prefixed (``navy`` → ``tinv-navy``);
  one given in the manifest is refused (the concept fails at planning, with the reason).

The folder mirrors the clients' own: ``webui/embeddings/{trigger}.safetensors`` (A1111's ``emb_params``
layout; SDXL ``clip_l`` / ``clip_g``) and ``webui/loras/{trigger}.safetensors`` (kohya's layout; a
pivotal one bundles its embedding under the trigger, A1111's ``bundle_emb``), each with
``{trigger}.preview.png`` (a sample) beside it, which A1111 shows on the file's card.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from tinv.errors import ConceptDataError

TRIGGER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
PREFIX = "tinv-"
"""Put before a default trigger that the base tokenizer reads as one token."""
EMBEDDINGS, LORAS = "webui/embeddings", "webui/loras"


def default_trigger(concept_id: str) -> str:
    """The trigger a concept gets when its manifest row names none: its id, each ``.`` made ``-``."""
    return concept_id.replace(".", "-")


def embedding_path(trigger: str) -> str:
    return f"{EMBEDDINGS}/{trigger}.safetensors"


def lora_path(trigger: str) -> str:
    return f"{LORAS}/{trigger}.safetensors"


def preview_path(file: str) -> str:
    """A1111's preview beside a model file: ``{stem}.preview.png``."""
    return file.removesuffix(".safetensors") + ".preview.png"


def resolve_triggers(
    wanted: Iterable[tuple[str, str]], one_token: Callable[[list[str]], set[str]]
) -> dict[str, str | ConceptDataError]:
    """concept id → its trigger, or the error that refuses it; ``wanted``: (concept id, manifest trigger or
    ``""``) pairs; ``one_token``: the words (lowercased) of those given that the base tokenizers read as one
    token. A trigger clashing with an earlier concept's (up to case) is refused for the later one."""
    wanted = list(wanted)
    candidates = {cid: given or default_trigger(cid) for cid, given in wanted}
    single = one_token(sorted({t.lower() for t in candidates.values()}))
    out: dict[str, str | ConceptDataError] = {}
    taken: dict[str, str] = {}
    for cid, given in wanted:
        trigger = candidates[cid]
        if trigger.lower() in single:
            if given:
                out[cid] = ConceptDataError(cid, f"trigger {given!r} is a word the base model's tokenizer reads as "
                                                 "one token; a web UI would replace that word in every prompt")
                continue
            trigger = PREFIX + trigger
        if trigger.lower() in taken:
            out[cid] = ConceptDataError(cid, f"trigger {trigger!r} is also concept {taken[trigger.lower()]!r}'s")
            continue
        taken[trigger.lower()] = cid
        out[cid] = trigger
    return out


def one_token_words(tokenizers: Iterable, words: list[str]) -> set[str]:
    """The ``words`` that any of ``tokenizers`` reads as a single token (lowercased)."""
    tokenizers = list(tokenizers)
    return {w.lower() for w in words if any(len(t.tokenize(w)) == 1 for t in tokenizers)}  # encode warns when long
