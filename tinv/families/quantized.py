"""A quantized frozen denoiser (``--base-precision``): the base's linear weights stored in int8 or fp8.

The frozen transformer is most of a FLUX.1 actor's memory (12 B parameters: 24 GB in bf16, 12 GB in int8 or
fp8), so peers offer a quantized frozen base (kohya's ``--fp8_base``, ai-toolkit's ``quantize``, diffusers'
quantization guide for FLUX.1). tinv uses torchao's weight-only configs through :func:`torchao.quantization.quantize_`
on every ``nn.Linear`` of the denoiser; peft wraps such layers in its ``TorchaoLoraLinear``, so the adapters,
one per packed concept, train in fp32 on top exactly as on an unquantized base. The text encoders and VAE are
left as they are (the new vectors' gradient crosses the encoders). int8 runs anywhere, the CPU included; fp8
needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and is refused elsewhere: torchao's
weight-only fp8 would run on older GPUs by dequantizing, but there int8 saves the same memory on kernels tinv tests,
so tinv refuses rather than run an untested path.

A quantized linear keeps its weight *dequantized* for the backward pass (torchao's weight-only layers save the
bf16 weight the input's gradient needs): without checkpointing every block's copy lives until the backward pass and
the base costs as much as an unquantized one. So a quantized base always trains with gradient checkpointing
(``load_base_model`` turns it on), which keeps one block's copy at a time.
"""

from __future__ import annotations

import torch

from tinv.errors import UnsupportedPrecisionError

BASE_PRECISIONS = ("auto", "int8", "fp8")
"""``auto``: the denoiser in the run's precision (``--precision``); ``int8``/``fp8``: its linear weights
quantized, weight-only."""
FP8_CAPABILITY = (8, 9)
"""The first CUDA compute capability with fp8 tensor cores (Ada)."""


def check_base_precision(base_precision: str, device: torch.device) -> None:
    """Raise :class:`UnsupportedPrecisionError` when ``base_precision`` cannot run on ``device``."""
    if base_precision not in BASE_PRECISIONS:
        raise UnsupportedPrecisionError(f"base precision must be one of {', '.join(BASE_PRECISIONS)}; "
                                        f"got {base_precision!r}")
    if base_precision == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_CAPABILITY:
            where = f"a GPU of compute capability {capability}" if capability else f"the {device.type}"
            raise UnsupportedPrecisionError(
                f"--base-precision fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, "
                f"Blackwell); this actor has {where}: use --base-precision int8")


def quantize_denoiser(denoiser: torch.nn.Module, base_precision: str, device: torch.device) -> None:
    """Quantize ``denoiser``'s linear weights in place as ``base_precision`` asks (nothing for ``auto``), each
    linear moved to ``device`` just before its weight is quantized (torchao's ``quantize_(…, device=)``), so a base
    loaded on the host reaches the GPU already quantized: FLUX.1's transformer takes 12 GB there, never 24."""
    check_base_precision(base_precision, device)
    if base_precision == "auto":
        return
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise UnsupportedPrecisionError(f"--base-precision {base_precision} needs torchao: "
                                        "pip install 'tinv[quantize]'") from e
    quantize_(denoiser, Int8WeightOnlyConfig() if base_precision == "int8" else Float8WeightOnlyConfig(),
              device=device)
