"""FLOP counting support for the ops our DaViT uses.

mmengine's ``FlopAnalyzer`` (behind ``get_model_complexity_info``) has no
handle for ``aten::scaled_dot_product_attention`` and silently skips it, which
would undercount any model that uses it (1.5 % of DaViT-T). Importing
davit_ext adds a handle that counts it like the two matmuls it replaces, in
mmengine's convention (one multiply-add = one FLOP).
"""
from math import prod
from typing import Any, List

from mmengine.analysis import complexity_analysis
from mmengine.analysis.jit_handles import get_shape

SDPA_OP = 'aten::scaled_dot_product_attention'


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of softmax(q k^T) v: ``batch * L * S * (E + Ev)``."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, length, embed = q
    source = k[-2]
    return prod(batch) * length * source * (embed + v[-1])


def register_flop_handles() -> None:
    """Add our handles to mmengine's default table (idempotent)."""
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.setdefault(
        SDPA_OP, sdpa_flop_jit)


def unregister_flop_handles() -> None:
    """Remove our handles from mmengine's table (others' stay)."""
    table = complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS
    if table.get(SDPA_OP) is sdpa_flop_jit:
        del table[SDPA_OP]
