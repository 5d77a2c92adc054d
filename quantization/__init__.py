# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Quantized loading of Chroma through transformers' own quantization configs, from a mode name. Not a hub file.

    from openchroma.quantization import load_quantized
    model = load_quantized("FlashLabs/Chroma-4B", "int8", device="cpu")

Modes (`MODES`), each needing its package (`pip install 'openchroma[quant]'` installs both):

    int8      torchao int8 weight-only (TorchAoConfig(Int8WeightOnlyConfig()))        CPU and CUDA   torchao
    int4      torchao int4 weight-only, group size 128, tinygemm layout, bfloat16     CUDA           torchao
    bnb-8bit  bitsandbytes LLM.int8 (BitsAndBytesConfig(load_in_8bit=True))           CUDA           bitsandbytes
    bnb-4bit  bitsandbytes NF4 with double quantization, bfloat16 compute             CUDA           bitsandbytes

torchao 0.18's int4 CPU kernels live in the `mslk` package, which has no CPU build on PyPI: int4 is a CUDA mode.

Which parts are quantized (`parts`): the linear layers of the thinker (text model and audio encoder) and of the
backbone by default. Always kept in the load dtype: Mimi (`codec_model`, in float32 by default, see
`ChromaConfig.codec_dtype`), the output heads (`thinker.lm_head`, `backbone.codebook0_head`, the depth decoder's
codebook heads) and every embedding table. The depth decoder (0.1 B parameters, 7 steps per frame that choose
codebooks 1..7) is kept unless `parts` names it. The choice travels as the config's `modules_to_not_convert`
(`llm_int8_skip_modules` for bitsandbytes), so a saved quantized checkpoint reloads with the same split.
"""

import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn


logger = logging.getLogger(__name__)

# The quantizable parts and the module-name patterns (transformers' modules_to_not_convert syntax) that keep them
PARTS = {
    "thinker": ["thinker"],
    "backbone": ["backbone.model"],
    "decoder": ["decoder"],
}
DEFAULT_PARTS = ("thinker", "backbone")
# Never quantized: Mimi and the output heads (embedding tables are not nn.Linear, no mode touches them)
ALWAYS_KEPT = ["codec_model", "thinker.lm_head", "backbone.codebook0_head"]


class QuantizationError(ValueError):
    """A mode that does not exist, or does not run on the requested device or dtype."""


@dataclass(frozen=True)
class QuantizationMode:
    name: str
    package: str  # the pip package it needs
    devices: Tuple[str, ...]
    description: str
    dtype: Optional[torch.dtype] = None  # the compute dtype it requires, if any
    device_note: str = ""


MODES = {
    "int8": QuantizationMode("int8", "torchao", ("cpu", "cuda"), "torchao int8 weight-only"),
    "int4": QuantizationMode(
        "int4", "torchao", ("cuda",), "torchao int4 weight-only (group size 128)", torch.bfloat16,
        "torchao's int4 CPU kernels need the `mslk` package, which has no CPU build on PyPI",
    ),
    "bnb-8bit": QuantizationMode("bnb-8bit", "bitsandbytes", ("cuda",), "bitsandbytes LLM.int8"),
    "bnb-4bit": QuantizationMode("bnb-4bit", "bitsandbytes", ("cuda",), "bitsandbytes NF4, bfloat16 compute",
                                 torch.bfloat16),
}


def package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_mode(mode: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
               ) -> QuantizationMode:
    """Validate `mode` for `device` (and the load `dtype`, if given) before anything loads. Raises
    `QuantizationError` (a ValueError) for an unknown mode, an unsupported device or dtype, `ImportError` when the
    mode's package is not installed."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    spec = MODES[mode]
    device_type = torch.device(device).type
    if device_type not in spec.devices:
        note = f" ({spec.device_note})" if spec.device_note else ""
        raise QuantizationError(
            f"quantization mode {mode!r} ({spec.description}) runs on {' and '.join(spec.devices)} only, "
            f"not on {device_type}{note}; on the CPU use 'int8'"
        )
    if not package_available(spec.package):
        raise ImportError(
            f"quantization mode {mode!r} needs the {spec.package} package: pip install {spec.package} "
            "(or pip install 'openchroma[quant]')"
        )
    if dtype is not None and spec.dtype is not None and dtype != spec.dtype:
        name = str(spec.dtype).removeprefix("torch.")
        raise QuantizationError(f"quantization mode {mode!r} computes in {name}: load it with dtype={spec.dtype} "
                                f"(--dtype {name}), not {dtype}")
    return spec


def modules_to_keep(parts: Iterable[str] = DEFAULT_PARTS) -> list:
    """Module-name patterns left unquantized when `parts` are quantized."""
    parts = list(parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise QuantizationError(f"parts must be a non-empty subset of {sorted(PARTS)}, got {parts}")
    return ALWAYS_KEPT + [pattern for part, patterns in PARTS.items() if part not in parts for pattern in patterns]


def quantization_config(mode: str, parts: Iterable[str] = DEFAULT_PARTS, compute_dtype=torch.bfloat16):
    """The transformers quantization config of `mode` (torchao / bitsandbytes imported here, never at top level)."""
    keep = modules_to_keep(parts)
    if mode in ("int8", "int4"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        if mode == "int8":
            quant_type = Int8WeightOnlyConfig()
        else:  # tinygemm's layout: CUDA kernels that ship with torch (the default "plain" layout needs mslk)
            quant_type = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        return TorchAoConfig(quant_type, modules_to_not_convert=keep)
    from transformers import BitsAndBytesConfig

    if mode == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    if mode == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep,
        )
    raise QuantizationError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")


def from_pretrained_kwargs(mode: str, device="cpu", dtype: Optional[torch.dtype] = None,
                           parts: Iterable[str] = DEFAULT_PARTS) -> dict:
    """`from_pretrained` keyword arguments that load a Chroma checkpoint quantized with `mode` onto `device`:
    quantization_config, dtype (the dtype of what stays unquantized and of the computation) and device_map."""
    spec = check_mode(mode, device, dtype)
    if dtype is None:
        dtype = spec.dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    return {"quantization_config": quantization_config(mode, parts, dtype), "dtype": dtype,
            "device_map": str(torch.device(device))}


def load_quantized(model, mode: str, device="cpu", dtype: Optional[torch.dtype] = None,
                   parts: Iterable[str] = DEFAULT_PARTS, **kwargs):
    """Load a Chroma checkpoint (hub id or folder) quantized with `mode`, in eval mode. An in-memory model is saved to
    a temporary folder first (quantization happens while transformers loads the weights). Extra keyword arguments go
    to `from_pretrained` (e.g. trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    import openchroma  # noqa: F401  (registers Chroma with the Auto classes)

    load_kwargs = from_pretrained_kwargs(mode, device, dtype, parts)
    if isinstance(model, nn.Module):
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            return load_quantized(folder, mode, device, dtype, parts, **kwargs)
    logger.info("loading %s with %s quantization (%s) on %s", model, mode, MODES[mode].description, device)
    return AutoModelForCausalLM.from_pretrained(model, **load_kwargs, **kwargs).eval()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: torchao subclasses are counted through their inner tensors,
    bitsandbytes weights with their scales (int8 row statistics, 4-bit block absmax)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.nelement() * tensor.element_size()
    for extra in (getattr(tensor, "SCB", None), getattr(getattr(tensor, "quant_state", None), "absmax", None)):
        if isinstance(extra, torch.Tensor):
            total += extra.nelement() * extra.element_size()
    return total


def weight_bytes(model: nn.Module, prefix: str = "") -> int:
    """Bytes of the parameters and buffers of `model` (shared tensors once), quantized ones at their real size;
    `prefix` restricts the count to one part (e.g. "codec_model")."""
    seen, total = set(), 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(prefix) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


__all__ = [
    "ALWAYS_KEPT", "DEFAULT_PARTS", "MODES", "PARTS", "QuantizationError", "QuantizationMode", "check_mode",
    "from_pretrained_kwargs", "load_quantized", "modules_to_keep", "quantization_config", "tensor_bytes",
    "weight_bytes",
]
