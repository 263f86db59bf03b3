"""`KernelDecoderBlock`: a `DecoderBlock` whose decode steps run as one kernel call (decode_layer.c).

A decode step of a small model on a CPU is short (about 13 ms for a 124M int8 model), and a
block's forward in Python is about forty module calls and tensor ops: norms, projections,
RoPE, the cache write, attention, the gate, residuals, SwiGLU. Measured on a 2-core AMD EPYC,
those cost ~0.25 ms a layer around the kernels that do the arithmetic, a quarter of an int8
step. The fused call runs the same kernels in the same order, so its output equals the
unfused serving path's to float rounding.

It applies where the step's plan offers `run_decode_layer` (a decode-only fp32 CPU step of the
paged cache, `PackedView`) and the block is what the kernel implements: GQA (optionally with
qk-norm and the output gate) with its projections fused, the dense SwiGLU MLP, and every
linear layer on the kernels (fp32 `PackedLinear` up to `F32_MAX_ROWS` rows, weight-only bf16
`PackedLinear` up to `BF16_MAX_ROWS`, or `Int8Linear` up to `INT8_MAX_ROWS`). Anything else (MLA, MoE, LoRA's separate projections, bigger batches,
prefill) runs the block's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from astrai_core.model.attention import GQA
from astrai_core.model.block import DecoderBlock
from astrai_core.model.cache import AttentionPlan, PagedCache
from astrai_core.model.mlp import MLP
from astrai_serve import kernels
from astrai_serve.kernels.native import BF16, F32, Q8, DecodeLayer, LinearRef, _ptr


class KernelDecoderBlock(DecoderBlock):
    """The block's own submodules (state-dict names unchanged) plus its `DecodeLayer`."""

    def __init__(self, block: DecoderBlock, layer: DecodeLayer) -> None:
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.kernel_layer = layer
        self.format = layer.qkv.format  # the row limit is the linear kernels' (read per call, as theirs is)

    @property
    def max_rows(self) -> int:
        return {Q8: kernels.INT8_MAX_ROWS, BF16: kernels.BF16_MAX_ROWS}.get(self.format, kernels.F32_MAX_ROWS)

    def forward(
        self,
        x: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | AttentionPlan | None = None,
        paged_cache: PagedCache | None = None,
    ) -> torch.Tensor:
        run = getattr(attention_mask, "run_decode_layer", None)
        if run is not None and x.shape[-2] <= self.max_rows:
            out = run(self.kernel_layer, x, rotary_emb)
            if out is not None:
                return out
        return super().forward(x, rotary_emb, attention_mask, paged_cache)


def fuse_decoder_blocks(model: nn.Module) -> int:
    """Swap every block the kernel implements for a `KernelDecoderBlock`; returns how many."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or kernels.load() is None:
        return 0
    swapped = 0
    for i, block in enumerate(layers):
        if type(block) is DecoderBlock and (kernel := kernel_block(block)) is not None:
            layers[i] = kernel
            swapped += 1
    return swapped


def kernel_block(block: DecoderBlock) -> KernelDecoderBlock | None:
    """The fused form of `block`, or None where the kernel does not implement it."""
    from astrai_serve.quantize import Int8Linear, KernelRMSNorm, PackedLinear

    attn, mlp = block.self_attn, block.mlp
    if type(attn) is not GQA or attn.qkv_proj is None or type(mlp) is not MLP or mlp.gate_up_proj is None:
        return None
    linears = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    norms = [block.input_layernorm, block.post_attention_layernorm]
    if attn.q_norm is not None:
        norms += [attn.q_norm, attn.k_norm]
    if not all(isinstance(n, KernelRMSNorm) for n in norms) or norms[0].norm_eps != norms[1].norm_eps:
        return None
    int8 = all(isinstance(lin, Int8Linear) and lin._kernels is not None for lin in linears)
    packed = all(isinstance(lin, PackedLinear) and lin.weight is not None for lin in linears)
    bf16 = packed and all(lin.weight_only_bf16 for lin in linears)
    if packed and (bf16 or not any(lin.weight_only_bf16 for lin in linears)):
        refs = [LinearRef(_ptr(lin.weight), None, _ptr(lin.bias), lin.out_features, lin.in_features,
                          BF16 if bf16 else F32) for lin in linears]
    elif int8:
        refs = [LinearRef(_ptr(lin.qweight), _ptr(lin.scales), _ptr(lin.bias), lin.out_features, lin.in_features, Q8)
                for lin in linears]
    else:
        return None
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    gated = len(attn._qkv_sizes) == 4
    if attn._qkv_sizes != [H * D, Hkv * D, Hkv * D] + ([H * D] if gated else []):
        return None
    q_norm, k_norm = attn.q_norm, attn.k_norm
    layer = DecodeLayer(
        *refs, _ptr(norms[0].weight), _ptr(norms[1].weight), None if q_norm is None else _ptr(q_norm.weight),
        None if k_norm is None else _ptr(k_norm.weight), norms[0].norm_eps,
        0.0 if q_norm is None else q_norm.norm_eps, attn.layer_id, H, Hkv, D, int(gated))
    return KernelDecoderBlock(block, layer)
