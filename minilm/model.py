"""A decoder-only GPT, readable top to bottom.

Token embedding (+ learned position embeddings, or rotary positions in attention) -> n_layer blocks ->
final norm -> LM head (tied to the token embedding by default). Each block is attention then MLP, with
the norm placed according to `placement`:

    pre:       x = x + f(norm(x))                 (GPT-2 and most modern LMs)
    post:      x = norm(x + f(x))                 (the original Transformer)
    sandwich:  x = x + norm_out(f(norm_in(x)))    (norm before and after each sublayer)
    reordered: x = x + norm(f(x))                 (OLMo 2: the norm on the sublayer's output only)

All norms come from the registry in `minilm.norms`, so `norm.kind` switches every one of them (including
the optional per-head query/key norm and the norm after the embedding) at once.

The defaults are GPT-2's model (nanoGPT's). Each other knob of ModelConfig adds one idea of today's small
models, and leaves the model as it is when off: rotary positions, ReLU^2 / SwiGLU MLPs, grouped-query
attention, soft-capped attention and output logits, a sigmoid gate on each head's output, a norm after
the embedding, zero-initialized output projections, and nanochat's value embeddings, x0 blend, smear and
backout (docs/model.md).
"""

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minilm.config import ModelConfig, NormConfig
from minilm.norms import build_norm

NormFactory = Callable[[int], nn.Module]  # a norm over the last dim of the given size
SMEAR_CHANNELS = 24     # the smear gate reads this many leading channels of the embedding (nanochat)
VE_GATE_CHANNELS = 12   # the value-embedding gate reads this many leading channels of the attention input


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden width. SwiGLU has three matrices to GELU's two, so (as Llama) its width is 2/3 of
    mlp_ratio x d_model, here rounded up to a multiple of 16 (what fp8 matmuls need): the parameter count
    matches the GELU MLP's to within 3 x 16 x d_model."""
    hidden = cfg.mlp_ratio * cfg.d_model
    return 16 * math.ceil(2 * hidden / 3 / 16) if cfg.mlp == "swiglu" else hidden


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) in fp32: bounded by cap, the identity to first order near 0 (Gemma 2)."""
    return cap * torch.tanh(x.float() / cap)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of x (..., time, d_head): the pair (x_i, x_{i+d/2}) at
    position t turns by the angle t * theta^(-2i/d). Computed in fp32 (or x's dtype if wider), returned in
    x's dtype; the angles are made on the fly (T x d/2 values), so there is no buffer to cast or save."""
    T, d = x.shape[-2], x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angle = torch.arange(T, device=x.device, dtype=dtype)[:, None] * inv_freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def attention_scale(cfg: ModelConfig) -> float:
    """The attention logits' scale: 1/sqrt(d_head) (SP); under μP 1/d_head, times sqrt(base d_head) so that it
    is SP's at model.base_width (Yang et al. 2022: q and k become correlated as they train, so q.k grows as d)."""
    d_head = cfg.d_model // cfg.n_head
    if cfg.parametrization == "sp":
        return d_head ** -0.5
    return d_head ** -0.5 * math.sqrt(cfg.base_width / cfg.d_model)  # = sqrt(base d_head) / d_head, n_head fixed


def softcapped_attention(q, k, v, scale: float, cap: float, dropout: float) -> torch.Tensor:
    """Causal attention with the logits q.k x scale soft-capped before the softmax (Gemma 2). Written out:
    fused SDPA kernels take no function of the logits; the (B, H, T, T) logits are materialized in fp32."""
    T = q.shape[-2]
    logits = softcap(q @ k.transpose(-1, -2) * scale, cap)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    p = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).to(v.dtype)
    return F.dropout(p, dropout) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: NormFactory, value_embed: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.d_head = cfg.d_model // cfg.n_head
        self.kv_dim = self.n_kv_head * self.d_head
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # qk-norm (Wortsman et al. 2023): normalizing each head's queries and keys
        # bounds the attention logits, which otherwise grow with the learning rate.
        self.q_norm = norm(self.d_head) if cfg.qk_norm else nn.Identity()
        self.k_norm = norm(self.d_head) if cfg.qk_norm else nn.Identity()
        self.rope_theta = (cfg.rope_theta or 10000.0) if cfg.position == "rope" else None
        self.attn_softcap = cfg.attn_softcap
        self.scale = attention_scale(cfg)
        self.sdpa_scale = None if self.scale == self.d_head ** -0.5 else self.scale  # None: SDPA's 1/sqrt(d_head)
        # Qiu et al. 2025: a sigmoid gate per head on the attention output, from the attention input
        self.gate = nn.Linear(cfg.d_model, cfg.n_head, bias=cfg.bias) if cfg.attn_gate else None
        # value embeddings (ResFormer, nanochat): a per-token table added to the values through a gate in (0, 3)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, cfg.d_model), self.n_kv_head, bias=False) \
            if value_embed else None
        self.dropout = cfg.dropout

    def project_qkv(self, x: torch.Tensor, value_embed: torch.Tensor | None = None):
        """Queries, keys, values as (batch, head, time, d_head), the keys and values of each kv head repeated
        for every query head of its group; what attention and the diagnostics use. `value_embed`, the layer's
        value embedding, enters the values only (the diagnostics, which read q and k, pass none)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([C, self.kv_dim, self.kv_dim], dim=2)
        if value_embed is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # (B, T, n_kv_head)
            v = v + (gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.d_head)).flatten(2)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2) for t in (k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            q, k = rotate(q, self.rope_theta), rotate(k, self.rope_theta)
        if self.n_kv_head != self.n_head:
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return q, k, v

    def forward(self, x: torch.Tensor, value_embed: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project_qkv(x, value_embed)
        dropout = self.dropout if self.training else 0.0
        if self.attn_softcap is None:
            # SDPA picks the flash / memory-efficient kernel where it can.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.sdpa_scale)
        else:
            y = softcapped_attention(q, k, v, self.scale, self.attn_softcap, dropout)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1).to(y.dtype)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, hidden = cfg.mlp, mlp_hidden(cfg)
        # SwiGLU's gate and up projections are one matrix (one matmul), split after it
        self.fc = nn.Linear(cfg.d_model, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: NormFactory, layer: int, value_embed: bool = False,
                 depth_scaling: bool = False):
        super().__init__()
        self.placement = cfg.placement
        self.attn = CausalSelfAttention(cfg, norm, value_embed)
        self.mlp = MLP(cfg)
        self.norm_attn = norm(cfg.d_model)
        self.norm_mlp = norm(cfg.d_model)
        if cfg.placement == "sandwich":
            self.norm_attn_out = norm(cfg.d_model)
            self.norm_mlp_out = norm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # LayerNorm Scaling (Sun et al. 2025): the input norms of block l (1-based) scaled by 1/sqrt(l), so
        # deep pre-norm blocks do not degenerate into the identity as the residual's variance grows
        self.input_scale = 1 / math.sqrt(layer + 1) if depth_scaling else None

    def normed(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = norm(x)
        return y if self.input_scale is None else y * self.input_scale

    def forward(self, x: torch.Tensor, value_embed: torch.Tensor | None = None) -> torch.Tensor:
        attn = partial(self.attn, value_embed=value_embed)
        if self.placement == "pre":
            x = x + self.drop(attn(self.normed(self.norm_attn, x)))
            return x + self.drop(self.mlp(self.normed(self.norm_mlp, x)))
        if self.placement == "post":
            x = self.norm_attn(x + self.drop(attn(x)))
            return self.norm_mlp(x + self.drop(self.mlp(x)))
        if self.placement == "reordered":
            x = x + self.drop(self.norm_attn(attn(x)))
            return x + self.drop(self.norm_mlp(self.mlp(x)))
        x = x + self.drop(self.norm_attn_out(attn(self.normed(self.norm_attn, x))))
        return x + self.drop(self.norm_mlp_out(self.mlp(self.normed(self.norm_mlp, x))))


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Value embeddings on every other layer, the last one included (nanochat)."""
    return layer % 2 == (n_layer - 1) % 2


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_cfg: NormConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.norm_cfg, self.vocab_size = cfg, norm_cfg, vocab_size
        # LayerNorm's and DyT's biases follow model.bias, like the linears'
        norm = partial(build_norm, str(norm_cfg.kind), eps=norm_cfg.eps, affine=norm_cfg.affine, bias=cfg.bias,
                       dyt_alpha=norm_cfg.dyt_alpha)
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        ve_layers = [i for i in range(cfg.n_layer) if cfg.value_embeds and has_value_embed(i, cfg.n_layer)]
        self.blocks = nn.ModuleList(Block(cfg, norm, i, i in ve_layers, norm_cfg.depth_scaling)
                                    for i in range(cfg.n_layer))
        # Post-norm already ends every block with a norm; the others need a final one.
        self.norm_f = norm(cfg.d_model) if cfg.placement != "post" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.embed_norm = norm(cfg.d_model) if cfg.embed_norm else nn.Identity()
        # nanochat's tricks, each off (absent) by default
        kv_dim = self.blocks[0].attn.kv_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, kv_dim) for i in ve_layers})
        if cfg.x0_blend:  # x <- resid_lambda x + x0_lambda x0 before each block, x0 the block input of layer 0
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(0.2 - 0.15 * torch.arange(cfg.n_layer) / max(cfg.n_layer - 1, 1))
        if cfg.smear:  # x_t <- x_t + smear_lambda sigmoid(gate(x_t)) x_{t-1}: the previous token, cheaply
            self.smear_gate = nn.Linear(min(SMEAR_CHANNELS, cfg.d_model), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:  # subtract backout_lambda x the residual after block n_layer // 2 before the final norm
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        # μP (model.parametrization=mup): the hidden matrices' width multipliers (their init and LR scale by
        # them), and the head's input multiplier base_width / d_model (mup's MuReadout); none under SP
        mup = cfg.parametrization == "mup"
        self.width_mults = hidden_width_mults(self) if mup else {}
        self.readout_mult = cfg.base_width / cfg.d_model if mup and cfg.base_width != cfg.d_model else None
        self._init_weights(cfg.init)

    def _init_weights(self, scheme: str) -> None:
        """gpt2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer) so the residual
        stream's variance does not grow with depth. zero_proj: gpt2's, with the output projections of
        attention and MLP at zero, so each block starts as the identity (modded-nanogpt, nanochat).
        xavier: Xavier-normal linears and N(0, 1/d_model) embeddings, the setting of Xiong et al. 2020's
        pre/post-norm analysis. The gates of the value embeddings and of smear start at U(0, 0.02)."""
        def init(module: nn.Module) -> None:
            if module is self.lm_head and self.cfg.tie_embeddings and scheme == "xavier":
                return  # it is the token embedding, initialized as one
            if isinstance(module, nn.Linear):
                if scheme == "xavier":
                    nn.init.xavier_normal_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.d_model**-0.5 if scheme == "xavier" else 0.02)

        self.apply(init)  # children first, the order every seed's init has been drawn in
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and scheme == "gpt2":
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            elif name.endswith("proj.weight") and scheme == "zero_proj":
                nn.init.zeros_(p)
            elif name.endswith(("ve_gate.weight", "smear_gate.weight")):
                nn.init.uniform_(p, 0.0, 0.02)
            if name in self.width_mults:  # μP: a hidden matrix's std / sqrt(width mult), as mup.init.normal_
                with torch.no_grad():
                    p.mul_(self.width_mults[name] ** -0.5)

    def num_params(self) -> int:
        """Parameters, counting the tied head once and excluding position embeddings (as GPT-2 does)."""
        return sum(p.numel() for p in self.parameters()) - (self.pos_emb.weight.numel() if self.pos_emb else 0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for token ids (batch, time); fp32 when soft-capped."""
        T = idx.shape[1]
        if self.cfg.block_size < T:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        x = self.drop(self.embed_norm(x))
        if self.cfg.smear:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :self.smear_gate.in_features]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, middle = x, None
        for i, block in enumerate(self.blocks):
            if self.cfg.x0_blend:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None)
            if i == self.cfg.n_layer // 2:
                middle = x
        if self.cfg.backout:
            x = x - self.backout_lambda * middle
        x = self.norm_f(x)
        logits = self.lm_head(x if self.readout_mult is None else x * self.readout_mult)
        return logits if self.cfg.logit_softcap is None else softcap(logits, self.cfg.logit_softcap)


def hidden_width_mults(model: "GPT") -> dict[str, float]:
    """μP's hidden matrices of `model` by parameter name, each with its width multiplier (its fan-in over the base
    model's), found as mup's set_base_shapes finds them: the weights both of whose dims differ from the base
    model's, the base model being this one at d_model = model.base_width. Every other parameter (embeddings, the
    head, the fixed-width gates, norm gains, biases, scalars) keeps SP's init and Adam LR."""
    with torch.device("meta"):  # shapes only: no memory, no draw from the RNG
        base = GPT(replace(model.cfg, d_model=model.cfg.base_width, parametrization="sp"), model.norm_cfg,
                   model.vocab_size)
    base_shapes = {name: p.shape for name, p in base.named_parameters()}
    return {name: p.shape[1] / base_shapes[name][1] for name, p in model.named_parameters()
            if p.dim() == 2 and p.shape[0] != base_shapes[name][0] and p.shape[1] != base_shapes[name][1]}


@torch.no_grad()
def generate(forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, new_tokens: int, block_size: int,
             generators: list[torch.Generator]) -> torch.Tensor:
    """Continue token ids (models, batch, time) by `new_tokens`, each model drawing with its own generator;
    `forward` maps ids (models, batch, time) to logits (models, batch, time, vocab): one model's forward
    with a leading dim of 1, or a batched ensemble's (vmap) forward."""
    for _ in range(new_tokens):
        logits = forward(idx[:, :, -block_size:])[:, :, -1, :]
        drawn = [next_token(model_logits, generator) for model_logits, generator in zip(logits, generators)]
        idx = torch.cat([idx, torch.stack(drawn)], dim=2)
    return idx


def next_token(logits: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 0.8, top_k: int = 50) -> torch.Tensor:
    """A token (batch, 1) drawn from the last position's logits (batch, vocab): top-k, then temperature."""
    logits = logits.float() / temperature
    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


class LossParts(NamedTuple):
    loss: torch.Tensor      # what to optimize: cross-entropy + z-loss term
    ce: torch.Tensor        # next-token cross-entropy (what train/loss logs)
    z_term: torch.Tensor    # z_loss * mean(log Z)^2 (0 when z_loss is 0)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> LossParts:
    """Next-token cross-entropy (+ z_loss * mean(log Z)^2), computed in fp32.

    z-loss (PaLM; Wortsman et al. 2023) keeps the softmax normalizer log Z near 0,
    preventing output-logit drift.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
    if z_loss == 0.0:
        return LossParts(ce, ce, torch.zeros_like(ce))
    z_term = z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return LossParts(ce + z_term, ce, z_term)
