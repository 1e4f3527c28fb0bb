"""Lower-precision copies of a decoder for CPU inference.

- ``bf16``: every weight cast to bfloat16 (the KV cache follows the weights' dtype); the
  matrix multiplies use the CPU's AVX-512 BF16 / AMX units where it has them. The guided
  logits are mixed in bfloat16 and turned into probabilities in float32.
- ``int8``: dynamic quantization of the Linear layers of the transformer blocks
  (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantized per
  batch on the fly); the embeddings and the LM head stay float32 (decoding computes the
  head on a window of ids, which a quantized Linear does not offer).
- ``fp32``: the model itself.

The result is a new module; the given model is not changed. Quality and speed on the
trained quickstart model are in docs/results.md.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from cm3leon.model.transformer import Transformer

PRECISIONS = ("fp32", "bf16", "int8")


def for_decoding(model: Transformer, precision: str) -> Transformer:
    """A copy of ``model`` (eval mode) whose decoding runs at ``precision`` (one of :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return model.eval()
    if next(model.parameters()).device.type != "cpu" and precision == "int8":
        raise ValueError("int8 dynamic quantization runs on the CPU; move the model to the CPU or use bf16")
    out = copy.deepcopy(model).eval()
    if precision == "bf16":
        return out.to(torch.bfloat16)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        out.blocks = torch.ao.quantization.quantize_dynamic(out.blocks, {nn.Linear}, dtype=torch.qint8)
    return out
