"""Optimizers and their schedule: the one place that sorts parameters into groups and builds the optimizer.

Every parameter is one of four kinds (`parameter_kinds`):

    matrix   the 2-D weights of the blocks (attention and MLP linears)
    embed    the embedding tables (token, position; a tied LM head is the token embedding)
    head     an untied LM head
    scalar   everything below 2-D: norm gains, biases, scalars

optim=adamw  AdamW over two groups: `decay` (matrix + head) and `no_decay` (embed + scalar), with
             one learning rate. Fused torch.optim.AdamW on fp32 weights, minilm's BF16AdamW on
             bf16 ones (precision=bf16_pure).
optim=muon   Muon (minilm/optim/muon.py) for the matrix group, AdamW for embed, head and scalar
             (as nanochat, modded-nanogpt and Moonlight split them). Each group's LR is a ratio of
             optim.lr (Muon's): one key sweeps the whole recipe while the ratios keep the proportions
             that were tuned together, and the study tooling that sweeps optim.lr works unchanged.

model.parametrization=mup (μP, Yang et al. 2022) splits out μP's hidden matrices (GPT.width_mults) by width
multiplier m, each group with an `lr_scale` (`mup_lr_scale`) and its weight decay / lr_scale, so the decay
per step stays SP's (as mup.MuAdam); every other group keeps SP's LR.

`set_schedule` sets each group's learning rate (and Muon's momentum) for a step; the trainer calls
it before every step, so a config change on resume takes effect at once.
"""

import math

import torch

from minilm.errors import ConfigError
from minilm.optim.skip_step import fold_skip

KINDS = ("matrix", "embed", "head", "scalar")


def parameter_kinds(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Every parameter of `model`, once (tied weights once), sorted by kind, in model.parameters() order."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if head is not None else set()
    kinds: dict[str, list[torch.nn.Parameter]] = {kind: [] for kind in KINDS}
    for p in model.parameters():
        if id(p) in embeddings:
            kinds["embed"].append(p)
        elif id(p) in head_ids:
            kinds["head"].append(p)
        elif p.dim() >= 2:
            kinds["matrix"].append(p)
        else:
            kinds["scalar"].append(p)
    return kinds


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    peak, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = peak * optim_cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def lr_ratio(group_name: str, optim_cfg) -> float:
    """A group's learning rate as a multiple of optim.lr."""
    return {"embed": optim_cfg.embed_lr_ratio, "head": optim_cfg.head_lr_ratio,
            "scalar": optim_cfg.scalar_lr_ratio}.get(group_name, 1.0)


def muon_momentum_at(step: int, optim_cfg) -> float:
    """Muon's momentum: linear from muon_momentum_start to muon_momentum over muon_momentum_warmup steps."""
    warmup = optim_cfg.muon_momentum_warmup
    frac = min(1.0, step / warmup) if warmup else 1.0
    return (1 - frac) * optim_cfg.muon_momentum_start + frac * optim_cfg.muon_momentum


def set_schedule(optimizer, step: int, optim_cfg, max_steps: int) -> None:
    """Each group's learning rate (and Muon's momentum) for step `step` (0-based)."""
    lr = lr_at(step, optim_cfg, max_steps)
    muon = optim_cfg.name == "muon"
    for group in optimizer.param_groups:
        group["lr"] = (lr * lr_ratio(group["name"], optim_cfg) if muon else lr) * group.get("lr_scale", 1.0)
        if group["name"] == "matrix":
            group["momentum"] = muon_momentum_at(step, optim_cfg)


def weight_decay(optim_cfg, ratio: float = 1.0) -> float:
    """The weight_decay a torch optimizer takes for optim.weight_decay: torch decays by lr_t x weight_decay;
    with optim.independent_weight_decay the group's peak LR (optim.lr x its ratio) is divided out."""
    if optim_cfg.independent_weight_decay:
        return optim_cfg.weight_decay / (optim_cfg.lr * ratio)
    return optim_cfg.weight_decay


def adamw(groups: list[dict], optim_cfg, precision, seed: int) -> torch.optim.Optimizer:
    """AdamW over `groups`: torch's fused one on fp32 weights (it honours the on-device found_inf flag, so
    skipping a step needs no host sync), minilm's BF16AdamW on bf16 ones (its stochastic rounding seeded by
    the run seed, the same on every rank)."""
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    if precision.name == "bf16_pure":
        from minilm.precision.bf16_pure import BF16AdamW

        return BF16AdamW(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps, rounding=precision.rounding,
                         seed=seed)
    return AdamW(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps, fused=True)


class AdamW(torch.optim.AdamW):
    """torch's AdamW that also honours skip-step's flag under the fp16 scaler (minilm/optim/skip_step.py)."""

    def step(self, closure=None):
        fold_skip(self)
        return super().step(closure)


def ns_dtype(optim_cfg, precision) -> str:
    """Muon's Newton-Schulz dtype for optim.muon_ns_dtype (auto: bf16 under bf16 autocast, else fp32)."""
    if optim_cfg.muon_ns_dtype != "auto":
        return str(optim_cfg.muon_ns_dtype)
    return "bf16" if precision.autocast_dtype == torch.bfloat16 else "fp32"


def mup_lr_scale(width_mult: float, optim_cfg) -> float:
    """μP's LR multiplier of a hidden matrix of width multiplier m. Adam (mup.MuAdam): 1 / m, so the update's
    effect on the activations stays the same at every width. Muon: its orthogonalized update has spectral norm
    1, and adjust_lr_fn=original scales it by sqrt(max(1, rows / cols)), which does not change with width:
    that is already the spectral condition for μP (Yang, Simon & Bernstein 2023: ||dW|| ~ sqrt(fan_out /
    fan_in)), so 1; match_rms_adamw scales by 0.2 sqrt(max(rows, cols)), which grows as sqrt(m), so 1 / sqrt(m)."""
    if optim_cfg.name == "adamw":
        return 1 / width_mult
    return width_mult ** -0.5 if optim_cfg.muon_adjust_lr == "match_rms_adamw" else 1.0


def hidden_groups(matrices: list[torch.nn.Parameter], width_mults: dict[int, float], optim_cfg,
                  decay: float) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """μP's groups of hidden matrices, one per LR scale (as mup.MuAdam), and the matrices left to SP's LR."""
    scaled: dict[float, list[torch.nn.Parameter]] = {}
    rest = []
    for p in matrices:
        scale = mup_lr_scale(width_mults[id(p)], optim_cfg) if id(p) in width_mults else 1.0
        (rest if scale == 1.0 else scaled.setdefault(scale, [])).append(p)
    groups = [{"params": params, "name": "matrix", "lr_scale": scale, "weight_decay": decay / scale}
              for scale, params in scaled.items()]
    return groups, rest


def build_optimizer(model: torch.nn.Module, optim_cfg, precision, seed: int):
    """The run's optimizer over every parameter of `model` (see the module docstring)."""
    kinds = parameter_kinds(model)
    named = dict(model.named_parameters())
    width_mults = {id(named[name]): m for name, m in getattr(model, "width_mults", {}).items()}
    if optim_cfg.name == "adamw":
        # weight decay on matrices only: not on norm gains, biases or embeddings
        scaled, matrices = hidden_groups(kinds["matrix"], width_mults, optim_cfg, weight_decay(optim_cfg))
        groups = [{"params": matrices + kinds["head"], "weight_decay": weight_decay(optim_cfg),
                   "name": "decay"},
                  {"params": kinds["embed"] + kinds["scalar"], "weight_decay": 0.0, "name": "no_decay"}]
        return adamw([g for g in groups + scaled if g["params"]] if scaled else groups, optim_cfg, precision, seed)
    from minilm.optim.muon import Muon, MuonAdamW

    odd = [tuple(p.shape) for p in kinds["matrix"] if p.dim() != 2]
    if odd:
        raise ConfigError(f"optim=muon updates 2-D matrices and this model has block weights of shape {odd[0]}; "
                          f"use optim=adamw")
    scaled, matrices = hidden_groups(kinds["matrix"], width_mults, optim_cfg, weight_decay(optim_cfg))
    muon = Muon([g for g in [{"params": matrices, "name": "matrix"}] + scaled if g["params"]], lr=optim_cfg.lr,
                weight_decay=weight_decay(optim_cfg), momentum=optim_cfg.muon_momentum,
                nesterov=optim_cfg.muon_nesterov, ns_steps=optim_cfg.muon_ns_steps,
                adjust_lr_fn=str(optim_cfg.muon_adjust_lr), ns_dtype=ns_dtype(optim_cfg, precision))
    groups = [{"params": kinds["head"], "name": "head",
               "weight_decay": weight_decay(optim_cfg, optim_cfg.head_lr_ratio)},
              {"params": kinds["embed"], "name": "embed", "weight_decay": 0.0},
              {"params": kinds["scalar"], "name": "scalar", "weight_decay": 0.0}]
    return MuonAdamW(muon, adamw([g for g in groups if g["params"]], optim_cfg, precision, seed))
