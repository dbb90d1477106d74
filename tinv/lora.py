"""Per-concept LoRA adapters on the UNet, through peft, with every sample routed to its own concept's.

DreamBooth (Ruiz et al. 2022, arXiv 2208.12242) fine-tunes the denoiser on a subject's pictures bound to a
rare token; its bulk-practical form trains low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) in
place of the weights, and pivotal tuning trains a new token's vectors and a LoRA together. Here each
trainer slot owns one peft adapter (``slot{s}``) on the UNet's attention projections. A forward pre-hook
on every LoRA layer hands it the adapter name of each sample in the batch (peft's mixed-batch forward),
so a packed batch sends each sample through its own concept's adapter and no other; samples of other
concepts (Textual Inversion) go through the base weights alone (``__base__``), also outside any routing.
The base weights are never touched: peft wraps each targeted layer and only the adapters train. The text
encoders can carry adapters of the same names (:data:`tinv.config.LORA_TEXT_TARGETS`), routed alike (:func:`routed`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch."""


class Adapters:
    """The LoRA adapters of one UNet, one per trainer slot, and the routing of samples to them."""

    def __init__(self, unet: nn.Module) -> None:
        """Use :meth:`of`: one module has one router (a second one's hooks would override the first's routes).
        ``unet`` is the module the adapters sit in: the UNet, or a text encoder."""
        self.unet = unet
        self.routes: list[str] | None = None
        self._hooked: set[int] = set()

    @classmethod
    def of(cls, unet: nn.Module) -> Adapters:
        """The adapters of ``unet``, made on first use."""
        if getattr(unet, "_tinv_adapters", None) is None:
            unet._tinv_adapters = cls(unet)
        return unet._tinv_adapters

    def layers(self) -> list[LoraLayer]:
        return [m for m in self.unet.modules() if isinstance(m, LoraLayer)]

    def add(self, name: str, rank: int, targets: Sequence[str], seed: int) -> list[nn.Parameter]:
        """A fresh adapter ``name`` of ``rank`` (alpha = rank, so its scale is 1) on ``targets``, replacing
        any adapter of that name; initialised from ``seed`` alone (A Gaussian, B zero: it starts as no
        change), so a concept starts the same in whichever slot it lands. Returns its parameters (fp32)."""
        self.remove(name)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # one adapter per slot, by design
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.unet, adapter_name=name)
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
        as :func:`tinv.lora_files.read_lora` gives a file's), on the modules it names."""
        if hasattr(self.unet, "text_model"):  # CLIP's names: nested in some transformers classes and versions
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        elif hasattr(self.unet, "encoder") and hasattr(self.unet, "embeddings"):  # a flattened CLIP text model
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise ValueError(f"a LoRA state of one rank expected, got ranks {sorted(ranks)}")
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        self.add(name, ranks.pop(), targets, seed=0)
        set_peft_model_state_dict(self.unet, state, adapter_name=name)

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
        state = get_peft_model_state_dict(self.unet, adapter_name=name)
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    @contextlib.contextmanager
    def routed(self, names: list[str]) -> Iterator[None]:
        """Inside, sample ``i`` of every batch goes through adapter ``names[i]`` (or :data:`BASE`)."""
        previous, self.routes = self.routes, names
        try:
            yield
        finally:
            self.routes = previous

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
    """:meth:`Adapters.routed` on every one of ``modules`` that has adapters (the UNet, the text encoders)."""
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
    """Adapter ``name`` of ``rank`` on each ``(module, targets)`` (the UNet first, then any text encoders; the
    i-th seeded ``seed + i``, so the UNet's is the same with or without the others); each one's parameters."""
    return [Adapters.of(module).add(name, rank, targets, seed + i) for i, (module, targets) in enumerate(places)]
