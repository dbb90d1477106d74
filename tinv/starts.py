"""Where a concept's new token vectors start (``--init``).

- ``word``: the initializer word's input embedding, every vector (Textual Inversion, Gal et al. 2022,
  arXiv 2208.01618; today's default);
- ``cross``: the text encoder's *output* for the initializer word (Cross Initialization, Pang et al. 2023,
  arXiv 2312.15905: a learned embedding ends far from its word's input embedding, in scale and direction,
  and near the encoder's output for it);
- a URI: the vectors an :class:`~tinv.initializer.Initializer` fitted on earlier runs' concepts predicts
  from the concept's own pictures (HyperDreamBooth's idea, Ruiz et al. 2023, arXiv 2307.06949: a start
  learned across many concepts, so each new one needs a fraction of the steps).

The trainer keeps a learned start only when its loss on the concept's fixed batch (the one DVAR uses) is
below the word start's (:meth:`tinv.trainer.PackedTrainer.admit`), so a bad prediction costs one pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinv import storage
from tinv.config import ConceptSpec
from tinv.errors import ConceptDataError, InitializerError
from tinv.initializer import INITIALIZER_NAME, Initializer, picture_features
from tinv.models import BaseModel

WORD, CROSS, LEARNED = "word", "cross", "learned"


def initializer_id(tokenizer, spec: ConceptSpec) -> int:
    """The one token id of the concept's initializer word (:class:`ConceptDataError` when it is several)."""
    ids = tokenizer.encode(spec.initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConceptDataError(spec.concept_id, f"initializer_token {spec.initializer_token!r} is {len(ids)} tokens "
                                                f"{pieces}; use a one-token word")
    return ids[0]


def word_start(model: BaseModel, spec: ConceptSpec) -> list[torch.Tensor]:
    """Per text encoder, ``(num_vectors, D)``: the initializer word's input embedding in every row."""
    rows = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        vector = encoder.get_input_embeddings().weight[initializer_id(tokenizer, spec)].detach().float()
        rows.append(vector.expand(spec.num_vectors, -1).clone())
    return rows


@torch.no_grad()
def cross_start(model: BaseModel, spec: ConceptSpec) -> list[torch.Tensor]:
    """Per text encoder, ``(num_vectors, D)``: the encoder's last hidden state at the initializer word in the
    prompt ``<bos> word <eos>`` (Cross Initialization's ``E(v_init)``), in every row."""
    rows = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        word = initializer_id(tokenizer, spec)
        ids = torch.tensor([[tokenizer.bos_token_id, word, tokenizer.eos_token_id]], device=encoder.device)
        hidden = encoder(ids).last_hidden_state[0, 1].float()
        rows.append(hidden.expand(spec.num_vectors, -1).clone())
    return rows


@dataclass
class Start:
    """A run's start (``--init``): its name, and the fitted initializer when it is a URI."""

    name: str
    initializer: Initializer | None = None

    def vectors(self, model: BaseModel, spec: ConceptSpec, images: torch.Tensor,
                means: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """Per text encoder, ``(num_vectors, D)``; None when a learned start has no prediction for this
        concept (no network for its vector count). ``means``: the pictures' VAE latent means, if known."""
        if self.name == WORD:
            return word_start(model, spec)
        if self.name == CROSS:
            return cross_start(model, spec)
        features = picture_features(model, images, self.initializer.features, means)
        return self.initializer.predict(features, spec.learnable_property, spec.num_vectors)


def initializer_uri(init: str) -> str:
    """A learned start's file: ``init`` itself when it names a ``.safetensors`` file, else that folder's
    :data:`INITIALIZER_NAME` (what ``jobs.fit_init --output`` writes)."""
    return init if init.endswith(".safetensors") else storage.join(init, INITIALIZER_NAME)


def load_start(init: str, storage_options: dict | None = None) -> tuple[Start, str]:
    """The start ``--init`` names (``word``, ``cross``, or an initializer's URI, read from storage) and its
    :func:`start_id`; :class:`InitializerError` when the file is not an initializer."""
    if init in (WORD, CROSS):
        return Start(init), init
    uri = initializer_uri(init)
    try:
        data = storage.read_bytes(uri, storage_options)
    except FileNotFoundError as e:
        raise InitializerError(f"no initializer at {uri} (--init: word, cross, or what jobs.fit_init wrote)") from e
    start = Start(LEARNED, Initializer.from_bytes(data))
    return start, start_id(start, data)


def choose(
    start: Start | None, word: list[torch.Tensor], model: BaseModel, spec: ConceptSpec, images: torch.Tensor,
    means: torch.Tensor | None, loss_of: Callable[[list[torch.Tensor]], float],
) -> tuple[list[torch.Tensor], dict]:
    """A concept's start rows and the record of it (``result.json``'s ``start``), ``word`` being its word
    start and ``means`` its pictures' VAE latent means (when known). For another start, ``loss_of`` (the
    fixed-batch loss of some rows) is asked of the word start and of the other; a learned start is kept only
    when its loss is below the word start's."""
    if start is None or start.name == WORD:
        return word, {"init": WORD}
    losses = {WORD: loss_of(word)}
    rows = start.vectors(model, spec, images, means)
    if rows is None:
        return word, {"init": WORD, "requested": start.name, "losses": losses,
                      "reason": f"the initializer has no network for {spec.num_vectors} vectors"}
    losses[start.name] = loss_of(rows)
    if start.name == LEARNED and not losses[LEARNED] < losses[WORD]:
        return word, {"init": WORD, "requested": LEARNED, "losses": losses,
                      "reason": "the predicted start's fixed-batch loss was not below the word start's"}
    return rows, {"init": start.name, "requested": start.name, "losses": losses}


def start_id(start: Start, data: bytes | None = None) -> str:
    """What a concept's config fingerprint holds of its start: ``word``, ``cross``, or ``learned:`` and the
    sha256 of the initializer file's bytes ``data`` (a refitted initializer is another start)."""
    return start.name if start.initializer is None else f"{LEARNED}:{hashlib.sha256(data or b'').hexdigest()}"


def dvar_history(record: dict) -> list[float]:
    """What DVAR's fixed-batch history starts from: a kept learned start's word-start loss (the same fixed
    batch), else nothing. DVAR stops when the loss's recent variance is a small share of its whole history's;
    a concept that starts near its optimum has no fall in its own history to measure against, and would
    train to its last step (toy world: 407 steps on average against the word start's 248). Counting the
    fall from the word start to the prediction gives it the history a word start would have had."""
    return [record["losses"][WORD]] if record.get("init") == LEARNED else []
