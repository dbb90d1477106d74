"""What each concept trains inside one frozen model: token vectors spliced into the text encoders' lookup, and a
LoRA adapter per concept through which only its own samples pass.

**Token vectors.** The base embedding table is never touched: ids below its size read it as before, ids of slot
tokens read trainable fp32 slot vectors. Slot ``s`` vector ``j`` is named in the tokenizer by its own internal
token ``<tinv-slot{s}-{j}>``, added once and reused, so one vocabulary serves every concept a trainer or sampler
ever sees (Textual Inversion, Gal et al. 2022, arXiv 2208.01618).

**Adapters.** DreamBooth (Ruiz et al. 2022, arXiv 2208.12242) fine-tunes the denoiser on a subject's pictures
bound to a rare token; its bulk-practical form trains low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685)
in place of the weights, and pivotal tuning trains a new token's vectors and a LoRA together. Each trainer slot
owns one peft adapter (``slot{s}``) on the family's LoRA targets. A forward pre-hook on every LoRA layer hands
it the adapter name of each sample in the batch (peft's mixed-batch forward), so a packed batch sends each
sample through its own concept's adapter and no other; samples of concepts without one go through the base
weights alone (``__base__``), also outside any routing. The base weights are never touched. The text encoders
can carry adapters of the same names, routed alike (:func:`routed`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from tinv.errors import ModelLayoutError
from tinv.families import checkpointing
from tinv.families.model import BaseModel


class SlotEmbedding(nn.Module):
    """Token lookup: base ids → frozen ``base``; slot-token ids → the slot vectors."""

    def __init__(self, base: nn.Embedding, vectors: list[nn.Parameter], ids: list[list[int]]) -> None:
        super().__init__()
        self.base = base
        self.vectors = vectors  # a plain list: the parameters belong to the trainer, not the encoder
        vocab, width = base.num_embeddings, vectors[0].shape[0]
        lookup = torch.zeros(max(i for row in ids for i in row) - vocab + 1, dtype=torch.long)
        for s, row in enumerate(ids):
            for j, token_id in enumerate(row):
                lookup[token_id - vocab] = s * width + j  # row of the flattened (S * M, D) table
        self.register_buffer("lookup", lookup.to(base.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, D)
        vocab = self.base.num_embeddings
        new = ids >= vocab  # (B, T)
        out = self.base(torch.where(new, 0, ids))  # (B, T, D) frozen dtype
        table = torch.stack(self.vectors).flatten(0, 1)  # (S * M, D) fp32
        rows = self.lookup[(ids - vocab).clamp(0, len(self.lookup) - 1)]  # (B, T)
        return torch.where(new[..., None], table[rows].to(out.dtype), out)


def slot_token_names(slots: int, max_vectors: int) -> list[list[str]]:
    """Internal token names, ``[slot][vector]``."""
    return [[f"<tinv-slot{s}-{j}>" for j in range(max_vectors)] for s in range(slots)]


def slot_words(names: list[str], num_vectors: int, held: int, word: str, encoders: int) -> list[str]:
    """A concept's word in each of ``encoders`` text encoders' prompts: its first ``num_vectors`` slot tokens
    ``names`` in the first ``held`` encoders (those that hold its vectors), ``word`` as plain text in the rest."""
    slot_word = " ".join(names[:num_vectors])
    return [slot_word if e < held else word for e in range(encoders)]


def register_slot_tokens(model: BaseModel, names: list[list[str]]) -> list[list[list[int]]]:
    """Add any missing slot tokens to every tokenizer; their ids per encoder, ``[e][slot][vector]``."""
    out = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        vocab_size, vocab = encoder.get_input_embeddings().num_embeddings, tokenizer.get_vocab()
        missing = [n for row in names for n in row if n not in vocab]
        if missing and len(tokenizer) < vocab_size:
            # a table padded past its tokenizer (T5's 32 128 rows for 32 100 tokens): filler names for the rows
            # between, so slot tokens land after the table, which is never resized
            tokenizer.add_tokens([f"<tinv-pad{i}>" for i in range(len(tokenizer), vocab_size)])
        if missing:
            if not all(
                t.startswith("<tinv-slot") for t in tokenizer.convert_ids_to_tokens(range(vocab_size, len(tokenizer)))
            ):
                raise ModelLayoutError(
                    f"tokenizer has {len(tokenizer)} tokens but its text encoder has {vocab_size} embedding rows"
                )
            tokenizer.add_tokens(missing)
        out.append([tokenizer.convert_tokens_to_ids(row) for row in names])
        if min(i for row in out[-1] for i in row) < vocab_size:
            raise ModelLayoutError("a slot token got an id inside the base vocabulary")
    return out


@contextmanager
def spliced(model: BaseModel, vectors: list[list[nn.Parameter]], ids: list[list[list[int]]]) -> Iterator[None]:
    """Within the block, encoder ``e`` looks slot ``s`` up in ``vectors[s][e]`` at ids ``ids[e][s]``."""
    embeddings = [te.get_input_embeddings() for te in model.text_encoders]
    try:
        for e, (encoder, base) in enumerate(zip(model.text_encoders, embeddings)):
            encoder.set_input_embeddings(SlotEmbedding(base, [row[e] for row in vectors], ids[e]))
        yield
    finally:
        for encoder, base in zip(model.text_encoders, embeddings):
            encoder.set_input_embeddings(base)

BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch."""


class Adapters:
    """The LoRA adapters of one module (the denoiser or a text encoder), one per trainer slot, and the routing of
    samples to them."""

    def __init__(self, module: nn.Module) -> None:
        """Use :meth:`of`: one module has one router (a second one's hooks would override the first's routes).
        ``module`` is the one the adapters sit in: the denoiser, or a text encoder."""
        self.module = module
        self.routes: list[str] | None = None
        self._hooked: set[int] = set()
        checkpointing.register(self)  # a checkpointed block's recomputation routes as its forward did

    def capture(self) -> list[str] | None:
        return self.routes

    def restore(self, routes: list[str] | None) -> list[str] | None:
        previous, self.routes = self.routes, routes
        return previous

    @classmethod
    def of(cls, module: nn.Module) -> Adapters:
        """The adapters of ``module``, made on first use."""
        if getattr(module, "_tinv_adapters", None) is None:
            module._tinv_adapters = cls(module)
        return module._tinv_adapters

    def layers(self) -> list[LoraLayer]:
        return [m for m in self.module.modules() if isinstance(m, LoraLayer)]

    def add(self, name: str, rank: int, targets: Sequence[str], seed: int) -> list[nn.Parameter]:
        """A fresh adapter ``name`` of ``rank`` (alpha = rank, so its scale is 1) on ``targets``, replacing
        any adapter of that name; initialised from ``seed`` alone (A Gaussian, B zero: it starts as no
        change), so a concept starts the same in whichever slot it lands. Returns its parameters (fp32)."""
        self.remove(name)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # one adapter per slot, by design
            warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated")  # merging is never asked
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.module, adapter_name=name)
        for layer in self.layers():
            if id(layer) not in self._hooked:
                layer.register_forward_pre_hook(self._route, with_kwargs=True)
                self._hooked.add(id(layer))
        params = self.parameters(name)
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def load(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Adapter ``name`` holding ``state`` (peft naming, as :meth:`state_dict` gives, scaled to alpha = rank
        as a family's ``read_lora`` gives a file's, named as this module names its layers), on the layers it names."""
        ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise ValueError(f"a LoRA state of one rank expected, got ranks {sorted(ranks)}")
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        self.add(name, ranks.pop(), targets, seed=0)
        set_peft_model_state_dict(self.module, state, adapter_name=name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter ``name``'s trainable tensors, in a fixed order."""
        return [p for layer in self.layers() if name in layer.lora_A
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]

    def remove(self, name: str) -> None:
        """Drop adapter ``name``. peft then makes another adapter "active"; routing ignores that (every
        sample names its own), so peft's warning about it is silenced."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
            for layer in self.layers():
                if name in layer.lora_A:
                    layer.delete_adapter(name)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s weights in peft's naming (``…to_q.lora_A.weight``), fp32 copies on the CPU."""
        state = get_peft_model_state_dict(self.module, adapter_name=name)
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    @contextlib.contextmanager
    def routed(self, names: list[str]) -> Iterator[None]:
        """Inside, sample ``i`` of every batch goes through adapter ``names[i]`` (or :data:`BASE`)."""
        previous = self.restore(names)
        try:
            yield
        finally:
            self.restore(previous)

    @classmethod
    def present(cls, modules: Sequence[nn.Module]) -> list[Adapters]:
        """The routers of those of ``modules`` that have one."""
        return [m._tinv_adapters for m in modules if getattr(m, "_tinv_adapters", None) is not None]

    def _route(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A batch twice the routes' length is classifier-free guidance's (unconditional, then conditional
        halves, as diffusers' pipelines stack them): both halves of a sample take its adapter."""
        batch, routes = len(args[0]), self.routes
        if routes is not None and batch == 2 * len(routes):
            routes = routes * 2
        if routes is not None and len(routes) != batch:
            raise ValueError(f"{len(routes)} routes for a batch of {batch} at a LoRA layer")
        return args, {**kwargs, "adapter_names": routes or [BASE] * batch}


@contextlib.contextmanager
def routed(modules: Sequence[nn.Module], names: list[str]) -> Iterator[None]:
    """:meth:`Adapters.routed` on every one of ``modules`` that has adapters (the denoiser, the text encoders)."""
    with contextlib.ExitStack() as stack:
        for adapters in Adapters.present(modules):
            stack.enter_context(adapters.routed(names))
        yield


def remove_everywhere(modules: Sequence[nn.Module], name: str) -> None:
    """Drop adapter ``name`` from each of ``modules`` that has adapters."""
    for adapters in Adapters.present(modules):
        adapters.remove(name)


def add_everywhere(
    places: Sequence[tuple[nn.Module, Sequence[str]]], name: str, rank: int, seed: int
) -> list[list[nn.Parameter]]:
    """Adapter ``name`` of ``rank`` on each ``(module, targets)`` (the denoiser first, then any text encoders;
    the i-th seeded ``seed + i``, so the denoiser's is the same with or without the others); each one's parameters."""
    return [Adapters.of(module).add(name, rank, targets, seed + i) for i, (module, targets) in enumerate(places)]
