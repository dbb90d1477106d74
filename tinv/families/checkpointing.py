"""Gradient checkpointing of the frozen model (diffusers' and transformers' own), exact under tinv's packing.

Checkpointing keeps only each block's inputs in the forward pass and runs the block again in the backward pass
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"). Two things must not change between the two
runs of a block:

- **State read at call time.** tinv's LoRA layers read, when called, which adapter each sample goes through
  (:class:`tinv.training.splice.Adapters`); the trainer sets those routes around a forward call only, and calls
  the model several times per step (one batch per latent size, the frozen targets of output preservation) before
  one backward pass. Every such holder registers here (:func:`register`), and torch.utils.checkpoint's
  ``context_fn`` captures its state as a block runs forward and restores it while that block runs again.
- **Dropout.** transformers checkpoints only layers in training mode, so those layers (and nothing else) are
  put in it; every module inside them stays in eval mode, so no dropout (T5 v1.1 has 0.1) acts.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch.utils.checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

if TYPE_CHECKING:
    from tinv.families.model import BaseModel


class CallState(Protocol):
    """What a layer reads when called, which the recomputation of a checkpointed block must see again."""

    def capture(self) -> Any:
        """The state now."""

    def restore(self, state: Any) -> Any:
        """Set ``state``; return the state it replaced."""


_HOLDERS: weakref.WeakSet[CallState] = weakref.WeakSet()


def register(holder: CallState) -> None:
    """Have every checkpointed block's recomputation see ``holder``'s state as the block's forward saw it."""
    _HOLDERS.add(holder)


@contextlib.contextmanager
def _restored(captured: list[tuple[CallState, Any]]) -> Iterator[None]:
    previous = [(holder, holder.restore(state)) for holder, state in captured]
    try:
        yield
    finally:
        for holder, state in previous:
            holder.restore(state)


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint's ``context_fn``, called as a block runs forward: nothing around the forward, the
    state captured now around the recomputation."""
    return contextlib.nullcontext(), _restored([(holder, holder.capture()) for holder in list(_HOLDERS)])


checkpoint: Callable[..., Any] = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                                   context_fn=_contexts)
"""The checkpoint function handed to diffusers' models."""


def enable_gradient_checkpointing(model: BaseModel) -> None:
    """Recompute the denoiser's and the text encoders' block activations in the backward pass instead of keeping
    them (see the module docstring)."""
    model.denoiser.enable_gradient_checkpointing(checkpoint)
    for encoder in model.text_encoders:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                             "context_fn": _contexts})
        for module in encoder.modules():
            module.training = isinstance(module, GradientCheckpointingLayer)


def disable_gradient_checkpointing(model: BaseModel) -> None:
    """Undo :func:`enable_gradient_checkpointing`: every block keeps its activations, every module in eval mode."""
    model.denoiser.disable_gradient_checkpointing()
    for encoder in model.text_encoders:
        encoder.gradient_checkpointing_disable()
        encoder.eval()
