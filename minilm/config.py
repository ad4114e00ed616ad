"""Config validation: every bad value fails here, in one line, before any work starts."""

import torch
from omegaconf import OmegaConf

from minilm.model import INITS, PLACEMENTS
from minilm.norms import NORM_KINDS, norm_unavailable_reason
from minilm.precision import PRECISIONS


class ConfigError(ValueError):
    """A bad config value; the message names the key, the value and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value, choices) -> None:
    _check(value in choices, f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _at_least(key: str, value, minimum, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > minimum if strict else value >= minimum)
    _check(ok, f"{key}={value!r} is not valid; it must be a number {'>' if strict else '>='} {minimum}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not valid; choose auto, cpu, cuda or cuda:N") from None
    _check(device.type in ("cpu", "cuda"), f"device={name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    _check(device.type != "cuda" or torch.cuda.is_available(),
           f"device={name!r} but no CUDA GPU is available; use device=cpu or device=auto")
    return device


def validate(cfg) -> torch.device:
    """Check the whole config; return the device it will run on."""
    device = resolve_device(cfg.device)
    _choice("norm", cfg.norm.kind, NORM_KINDS)
    _at_least("norm.eps", cfg.norm.eps, 0, strict=True)
    reason = norm_unavailable_reason(cfg.norm.kind, device.type)
    _check(reason is None, f"norm={cfg.norm.kind} cannot run on {device}: {reason}")
    _choice("precision", cfg.precision.name, PRECISIONS)

    m = cfg.model
    _choice("model.placement", m.placement, PLACEMENTS)
    _choice("model.init", m.init, INITS)
    for key in ("n_layer", "n_head", "d_model", "block_size", "mlp_ratio"):
        _at_least(f"model.{key}", m[key], 1)
    _check(m.d_model % m.n_head == 0,
           f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}; pick d_model a multiple of n_head")
    _check(0 <= m.dropout < 1, f"model.dropout={m.dropout!r} is not valid; it must be in [0, 1)")

    t = cfg.train
    for key in ("batch_size", "grad_accum", "eval_batches"):
        _at_least(f"train.{key}", t[key], 1)
    _at_least("train.log_interval", t.log_interval, 1)
    for key in ("max_steps", "eval_interval", "ckpt_interval", "sample_tokens"):
        _at_least(f"train.{key}", t[key], 0)
    _at_least("train.grad_clip", t.grad_clip, 0)

    o = cfg.optim
    _at_least("optim.lr", o.lr, 0, strict=True)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio!r} is not valid; it must be in [0, 1]")
    _at_least("optim.z_loss", o.get("z_loss", 0.0), 0)

    d = cfg.data
    _choice("data.source", d.source, ("pystdlib", "text", "hf"))
    _check(d.source != "text" or not OmegaConf.is_missing(d, "files"),
           "data=text needs data.files; pass paths or globs, e.g. data.files='[notes/*.txt]'")
    _at_least("data.vocab_size", d.vocab_size, 257)  # the 256 byte tokens + EOS
    _check(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction!r} is not valid; it must be in (0, 1)")
    g = cfg.diagnostics
    _at_least("diagnostics.interval", g.interval, 0)
    _at_least("diagnostics.spike_window", g.spike_window, 1)
    _at_least("diagnostics.spike_sigma", g.spike_sigma, 0, strict=True)
    _choice("logger", cfg.logger.backend, ("wandb", "none"))
    if cfg.logger.backend == "wandb":
        _choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline"))
    return device
