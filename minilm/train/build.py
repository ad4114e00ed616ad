"""A config made into the parts a run trains with: the model, the optimizer, the LR schedule, the compile mode.

The trainer, an ensemble's members and a replayed bundle (forensics) build the same way from here.
"""

import math

import torch
from omegaconf import OmegaConf

from minilm.model import GPT
from minilm.precision.policy import Precision


def build_optimizer(model: torch.nn.Module, optim_cfg, precision: Precision, seed: int) -> torch.optim.Optimizer:
    """AdamW (the precision's) with weight decay on matrices only: not on norm gains, biases or embeddings;
    coupled to the LR (AdamW's) or independent of it (optim.independent_weight_decay)."""
    decay, no_decay = [], []
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():  # tied weights appear once
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    weight_decay = optim_cfg.weight_decay
    if optim_cfg.independent_weight_decay:  # torch's AdamW decays by lr_t x weight_decay: divide the peak LR out
        weight_decay /= optim_cfg.lr
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return precision.optimizer(groups, optim_cfg, seed)


def build_model(cfg, vocab_size: int, precision: Precision) -> GPT:
    """The run's GPT on the precision's device, in the precision's number formats."""
    model = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), vocab_size)
    return precision.prepare_model(model.to(precision.device))


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    peak, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = peak * optim_cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def compile_mode(cfg) -> str | None:
    """torch.compile's mode for train.compile_mode (None: its default)."""
    return None if cfg.train.compile_mode == "default" else str(cfg.train.compile_mode)
