"""A decoder-only GPT, readable top to bottom.

Token + position embeddings -> n_layer blocks -> final norm -> LM head (tied to
the token embedding by default). Each block is attention then MLP, with the
norm placed according to `placement`:

    pre:       x = x + f(norm(x))                 (GPT-2 and most modern LMs)
    post:      x = norm(x + f(x))                 (the original Transformer)
    sandwich:  x = x + norm_out(f(norm_in(x)))    (norm before and after each sublayer)

All norms come from the registry in `minilm.norms`, so `norm.kind` switches every
one of them (including the optional per-head query/key norm) at once.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minilm.config import ModelConfig, NormConfig
from minilm.norms import build_norm

NormFactory = Callable[[int], nn.Module]  # a norm over the last dim of the given size


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: NormFactory):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_head = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # qk-norm (Wortsman et al. 2023): normalizing each head's queries and keys
        # bounds the attention logits, which otherwise grow with the learning rate.
        self.q_norm = norm(self.d_head) if cfg.qk_norm else nn.Identity()
        self.k_norm = norm(self.d_head) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.dropout

    def project_qkv(self, x: torch.Tensor):
        """Queries, keys, values as (batch, head, time, d_head); shared with diagnostics."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project_qkv(x)
        # SDPA picks the flash / memory-efficient kernel where it can.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: NormFactory):
        super().__init__()
        self.placement = cfg.placement
        self.attn = CausalSelfAttention(cfg, norm)
        self.mlp = MLP(cfg)
        self.norm_attn = norm(cfg.d_model)
        self.norm_mlp = norm(cfg.d_model)
        if cfg.placement == "sandwich":
            self.norm_attn_out = norm(cfg.d_model)
            self.norm_mlp_out = norm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.drop(self.attn(self.norm_attn(x)))
            return x + self.drop(self.mlp(self.norm_mlp(x)))
        if self.placement == "post":
            x = self.norm_attn(x + self.drop(self.attn(x)))
            return self.norm_mlp(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.norm_attn_out(self.attn(self.norm_attn(x))))
        return x + self.drop(self.norm_mlp_out(self.mlp(self.norm_mlp(x))))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_cfg: NormConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.norm_cfg, self.vocab_size = cfg, norm_cfg, vocab_size
        # LayerNorm's and DyT's biases follow model.bias, like the linears'
        norm = partial(build_norm, str(norm_cfg.kind), eps=norm_cfg.eps, affine=norm_cfg.affine, bias=cfg.bias,
                       dyt_alpha=norm_cfg.dyt_alpha)
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, norm) for _ in range(cfg.n_layer))
        # Post-norm already ends every block with a norm; the others need a final one.
        self.norm_f = norm(cfg.d_model) if cfg.placement != "post" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights(cfg.init)

    def _init_weights(self, scheme: str) -> None:
        """gpt2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer) so the residual
        stream's variance does not grow with depth. xavier: Xavier-normal linears and
        N(0, 1/d_model) embeddings, the setting of Xiong et al. 2020's pre/post-norm analysis."""
        def init(module: nn.Module) -> None:
            if module is self.lm_head and self.cfg.tie_embeddings and scheme != "gpt2":
                return  # it is the token embedding, initialized as one
            if isinstance(module, nn.Linear):
                if scheme == "xavier":
                    nn.init.xavier_normal_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02 if scheme == "gpt2" else self.cfg.d_model**-0.5)

        self.apply(init)  # children first, the order every seed's init has been drawn in
        if scheme == "gpt2":
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def num_params(self) -> int:
        """Parameters, counting the tied head once and excluding position embeddings (as GPT-2 does)."""
        return sum(p.numel() for p in self.parameters()) - self.pos_emb.weight.numel()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for token ids (batch, time)."""
        T = idx.shape[1]
        if self.cfg.block_size < T:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


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
