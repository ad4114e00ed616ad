"""QK-clip (optim.qk_clip_tau): Kimi K2's MuonClip rule (arXiv 2507.20534, alpha = 0.5), and the per-head
max attention logit it reads (also logged by the diagnostics as diag/attn_logit_max_head/L{i}/H{h}).

The logit is the one the softmax sees before any soft-cap: q.k / sqrt(d_head), after qk-norm and RoPE,
over the causal (query, key) pairs, computed in fp32 from each attention layer's input.

Each step, before the update, `observe` runs the model without gradients on each micro-batch (an eager
pass, under the step's autocast and a forked RNG, stopped at the last attention layer's input) and keeps
the per-head max S_h over the step's micro-batches (and, data parallel, over the ranks). After the update,
`clip` scales, for each head with S_h > tau, the logits by gamma_h = tau / S_h:

    a head's own key    its query rows and key rows (weight and bias) by sqrt(gamma_h) each (alpha = 0.5)
    a shared key (GQA)  the key, shared by the heads of its group, is left alone and the query rows take
                        all of gamma_h (Kimi K2's rule for MLA's shared rotary key), so no other head moves

Heads at or below tau are multiplied by exactly 1.0: bitwise untouched. With the weights that computed
S_h, the clipped layer's logits on that input are gamma_h x theirs, <= tau (RoPE is a rotation, linear in
q and k); the same step's update moved the weights by one update on top of that, as in Kimi K2. A step
whose update was not applied (a non-finite gradient, skip-step) is not clipped. Everything is device math
(torch.where): no host sync.
"""

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

CHUNK_ELEMENTS = 2**26  # bound the fp32 (batch, head, T, T) logits held at once


def causal_logit_chunks(q: torch.Tensor, k: torch.Tensor):
    """q.k / sqrt(d_head) for q, k of shape (B, H, T, d_head), in chunks of the batch, future keys at -inf."""
    B, H, T, d = q.shape
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    chunk = max(1, CHUNK_ELEMENTS // (H * T * T))
    for qc, kc in zip(q.split(chunk), k.split(chunk)):
        yield (qc @ kc.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))


def head_logit_max(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each head's max causal logit (H,) for q, k of shape (B, H, T, d_head)."""
    return torch.stack([logits.amax(dim=(0, 2, 3)) for logits in causal_logit_chunks(q, k)]).amax(dim=0)


def attention_qk(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 queries and keys (B, H, T, d_head) of attention layer `attn` for its input `h`, after qk-norm
    and RoPE (GQA keys repeated per query head), recomputed without autocast (bf16 for a bf16_pure model).
    Where the layer's attention scale is not 1/sqrt(d_head) (μP's 1/d_head), q carries the ratio, so that
    q.k / sqrt(d_head) is the logit the layer's softmax sees."""
    with torch.autocast(h.device.type, enabled=False):
        q, k, _ = attn.project_qkv(h.to(attn.qkv.weight.dtype))
    q = q.float()
    if attn.sdpa_scale is not None:  # None: SDPA's own 1/sqrt(d_head), nothing to carry (SP stays bitwise)
        q = q * (attn.sdpa_scale * math.sqrt(attn.d_head))
    return q, k.float()


class _PastLastAttention(Exception):
    """Raised by the last attention layer's input hook: nothing after it is needed."""


@contextmanager
def attention_inputs(model: nn.Module, stop_after_last: bool = False):
    """A dict that a forward of `model` inside the block fills with each attention layer's input, by layer;
    with `stop_after_last`, the forward ends there (the caller's forward returns nothing)."""
    inputs: dict[int, torch.Tensor] = {}
    last = len(model.blocks) - 1

    def keep(i):
        def hook(_module, args):
            inputs[i] = args[0]
            if stop_after_last and i == last:
                raise _PastLastAttention
        return hook

    handles = [block.attn.register_forward_pre_hook(keep(i)) for i, block in enumerate(model.blocks)]
    try:
        yield inputs
    except _PastLastAttention:
        pass
    finally:
        for handle in handles:
            handle.remove()


class QKClip:
    def __init__(self, model: nn.Module, tau: float):
        self.model, self.tau = model, tau
        self.maxima: torch.Tensor | None = None  # (n_layer, n_head), the step's so far

    @torch.no_grad()
    def observe(self, x: torch.Tensor, autocast) -> None:
        """Fold the per-head max logits of the model on micro-batch `x` into the step's."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(), attention_inputs(self.model, True) as inputs:
            self.model(x)
        maxima = torch.stack([head_logit_max(*attention_qk(block.attn, inputs[i]))
                              for i, block in enumerate(self.model.blocks)])
        self.maxima = maxima if self.maxima is None else torch.maximum(self.maxima, maxima)

    @torch.no_grad()
    def clip(self, grad_norm: torch.Tensor, skip: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """After the step's update: clip the heads whose max logit exceeded tau, if the update was applied
        (a finite gradient norm, which fp16's scaler also skips on, and no skip-step); returns the count."""
        maxima, self.maxima = self.maxima, None
        if dist.is_available() and dist.is_initialized():  # every rank clips alike, on the max over the ranks
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        applied = torch.isfinite(grad_norm) if skip is None else torch.isfinite(grad_norm) & ~skip
        exceeded = (maxima > self.tau) & torch.isfinite(maxima) & applied
        gamma = torch.where(exceeded, self.tau / maxima, 1.0)
        for block, layer_gamma in zip(self.model.blocks, gamma):
            scale_heads(block.attn, layer_gamma)
        return {"optim/qk_clipped_heads": exceeded.sum()}


def scale_heads(attn: nn.Module, gamma: torch.Tensor) -> None:
    """Scale head h's logits by gamma[h] through its query and key rows of the qkv projection (see above)."""
    H, d, shared = attn.n_head, attn.d_head, attn.n_kv_head != attn.n_head
    q_scale = gamma if shared else gamma.sqrt()
    params = [attn.qkv.weight] + ([attn.qkv.bias] if attn.qkv.bias is not None else [])
    for p in params:
        rows = p.view(p.shape[0], -1)  # a bias as a column
        rows[:H * d].view(H, d, -1).mul_(q_scale.to(p.dtype)[:, None, None])
        if not shared:
            rows[H * d:2 * H * d].view(H, d, -1).mul_(gamma.sqrt().to(p.dtype)[:, None, None])
