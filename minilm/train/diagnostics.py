"""Stability diagnostics: what a run logs so that an instability can be explained.

Sampled metrics (step 1 and every `diagnostics.interval` steps), observed and never perturbed:

1. `observe_forward`, before the step's own forward: the eager model runs once more on the
   step's first micro-batch, under no_grad, the same autocast and a forked RNG (dropout draws
   the masks the training forward will draw; the training stream is left untouched). Forward
   hooks read the activations; attention logits are recomputed in fp32 from each attention
   input with `CausalSelfAttention.project_qkv`. A separate pass rather than hooks on the
   training forward keeps the training graph as it is and works alike under torch.compile
   (whose graphs ignore hooks added later) and DDP.
2. `observe_gradients`, after backward and unscaling, before clipping: gradient and parameter
   RMS per parameter group; the parameters are snapshotted for (3).
3. `observe_update`, after the optimizer step: update RMS and update-to-weight ratio per group.
4. With `diagnostics.norm_probe`, `probe_norm`: the first norm's output error on probe rows of small
   variance, given in the run's compute dtype, against float64 (the numerics of tiny-variance rows).
5. With `diagnostics.block_skip`, at every evaluation, `block_skip_dloss`: the held-out loss with one
   block skipped (its input passed on as its output: the residual stream goes through) minus the full
   loss, per block; a block the model barely uses scores near 0 (Sun et al. 2025, the curse of depth).

Every value stays a device tensor until the trainer's next metrics flush fetches them all at
once (`collect`), so sampling adds compute but no host synchronization.

Per-step host bookkeeping over the logged values, always on (no device work): the loss and
grad-norm spike scores and the clip fraction. Metric names are listed in docs/diagnostics.md (Metrics).
"""

import math
import resource
import sys
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from minilm.model import softcap
from minilm.norms import float64_norm, norm_spec
from minilm.norms.dyt import dyt
from minilm.optim.qk_clip import attention_inputs, attention_qk, causal_logit_chunks
from minilm.rundir import PROBE_MEANS

FP16_MAX = torch.finfo(torch.float16).max  # 65504
# Probe rows for the norm: mean + std * z (PROBE_MEANS), z fixed with mean 0 and std 1 per row.
PROBE_STDS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
PROBE_ROWS = 64
_TOP_LEVEL_GROUPS = {"tok_emb": "embed", "pos_emb": "embed", "value_embeds": "embed", "lm_head": "head",
                     "norm_f": "final_norm"}


def param_group(name: str) -> str:
    """A parameter's diagnostics group: L{i}.attn, L{i}.mlp, L{i}.norm (every norm gain and bias of
    block i, the qk-norms included), embed (token + position + value embeddings), head (an untied LM head),
    final_norm; any other top-level parameter (embed_norm, smear_gate, x0_lambdas, ...) is its own group."""
    parts = name.split(".")
    if parts[0] == "blocks":
        kind = "norm" if any("norm" in part for part in parts[2:-1]) else parts[2]
        return f"L{parts[1]}.{kind}"
    return _TOP_LEVEL_GROUPS.get(parts[0], parts[0])


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every norm layer, by qualified name (blocks.0.norm_attn, blocks.0.attn.q_norm, norm_f, ...)."""
    return [(name, m) for name, m in model.named_modules()
            if "norm" in name.rsplit(".", 1)[-1] and not isinstance(m, nn.Identity)]


def rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).mean().sqrt()


def residual_variance(t: torch.Tensor) -> torch.Tensor:
    """The mean over positions of the variance over features (fp32): the residual stream's spread per block."""
    return t.float().var(dim=-1, correction=0).mean()


class SkippedBlock(nn.Module):
    """A block left out: its input, the residual stream, is its output (a value embedding it is given is unused)."""

    def forward(self, x: torch.Tensor, _value_embed: torch.Tensor | None = None) -> torch.Tensor:
        return x


@torch.no_grad()
def block_skip_dloss(model: nn.Module, val_loss: Callable[[nn.Module], float], full: float) -> dict[str, float]:
    """{diag/block_skip_dloss/L{i}: val_loss(model with block i skipped) - full}: block i swapped for the
    pass-through, so the residual stream goes on unchanged, then put back."""
    found = {}
    for i, block in enumerate(model.blocks):
        model.blocks[i] = SkippedBlock()
        try:
            found[f"diag/block_skip_dloss/L{i}"] = val_loss(model) - full
        finally:
            model.blocks[i] = block
    return found


def group_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a list of tensors taken as one vector, in fp32."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def beyond_fp16(t: torch.Tensor, absolute: torch.Tensor | None = None) -> torch.Tensor:
    """How many elements of `t` an fp16 tensor could not hold: |x| > 65504, inf or nan."""
    absolute = t.abs() if absolute is None else absolute
    return t.numel() - torch.count_nonzero(absolute <= FP16_MAX)  # nan compares false


def attention_stats(q: torch.Tensor, k: torch.Tensor, cap: float | None = None) -> dict[str, torch.Tensor]:
    """For q, k of shape (B, H, T, d_head): each head's max causal logit q.k/sqrt(d_head) before any soft-cap
    (`head_max`, (H,)), and from the softmax as attention computes it (after the soft-cap `cap`) the mean
    entropy in nats (`entropy`) and the mean probability on position 0 (`sink`), both over batch, heads and
    queries; the sink leaves out query 0, which can attend to position 0 only."""
    B, H, T, _ = q.shape
    maxima, entropy, sink = [], torch.zeros((), device=q.device), torch.zeros((), device=q.device)
    for logits in causal_logit_chunks(q, k):
        maxima.append(logits.amax(dim=(0, 2, 3)))
        if cap is not None:  # capped as attention caps them, the future masked again (tanh(-inf) = -1)
            logits = softcap(logits, cap).masked_fill(logits == float("-inf"), float("-inf"))
        p = torch.softmax(logits, dim=-1)
        entropy -= torch.special.xlogy(p, p).sum()  # xlogy(0, 0) = 0 on the masked entries
        sink += p[:, :, 1:, 0].sum()
    return {"head_max": torch.stack(maxima).amax(dim=0), "entropy": entropy / (B * H * T),
            "sink": sink / (B * H * max(T - 1, 1))}


@torch.no_grad()
def norm_probe_errors(norm: nn.Module, kind: str, width: int, dtype: torch.dtype, autocast, device) -> dict:
    """Relative RMS errors of `norm` on probe rows given in `dtype` under `autocast`, against the float64
    normalization of the exact rows: `norm_error/<centred|offset>/<std>` with eps = 0 (what normalizing
    should give: eps's bias counts as error) and `norm_rounding_error/...` with the norm's own eps (the
    arithmetic alone). DyT normalizes nothing, so it has no `norm_error`; its `norm_rounding_error` is
    against float64 DyT with its own alpha. Its own generator: the training RNG is untouched."""
    z = torch.randn(PROBE_ROWS, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, correction=0, keepdim=True)
    weight, bias = (None if p is None else p.double().cpu() for p in (norm.weight, getattr(norm, "bias", None)))
    twin = norm_spec(kind).twin
    if twin == "dyt":
        truths = {"norm_rounding_error": lambda x: dyt(x, norm.alpha.double().cpu(), weight, bias)}
    else:
        def exact(x, eps):
            y = float64_norm(twin, x, eps)[0]
            return y if weight is None else y * weight + (0.0 if bias is None else bias)

        truths = {"norm_error": lambda x: exact(x, 0.0), "norm_rounding_error": lambda x: exact(x, norm.eps)}
    errors = {}
    for family, mean in PROBE_MEANS.items():
        for std in PROBE_STDS:
            x = mean + std * z
            with autocast:
                y = norm(x.to(device, dtype)).double().cpu()
            for name, exact_of in truths.items():
                truth = exact_of(x)
                errors[f"{name}/{family}/{std:.0e}"] = (y - truth).norm() / truth.norm()
    return errors


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by tensors, or the CPU process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class SpikeScore:
    """The fraction of steps at least `sigma` standard deviations from the mean of the `window`
    finite values before them. Non-finite values are neither scored nor windowed: divergence and
    optim/skipped_updates count those."""

    def __init__(self, window: int, sigma: float):
        self.values: deque = deque(maxlen=window)
        self.sigma = sigma
        self.spikes = self.scored = 0

    def update(self, value: float) -> None:
        if not math.isfinite(value):
            return
        if len(self.values) == self.values.maxlen:
            mean = sum(self.values) / len(self.values)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / len(self.values))  # mean first
            deviation = abs(value - mean)
            self.scored += 1
            self.spikes += deviation > 0 and deviation >= self.sigma * std
        self.values.append(value)

    @property
    def score(self) -> float | None:
        return self.spikes / self.scored if self.scored else None

    def state_dict(self) -> dict:
        return {"values": list(self.values), "spikes": self.spikes, "scored": self.scored}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.spikes, self.scored = state["spikes"], state["scored"]


class Diagnostics:
    def __init__(self, model: nn.Module, precision, diag_cfg, enabled: bool = True):
        self.model, self.precision = model, precision
        self.interval = diag_cfg.interval if enabled else 0
        self.norm_probe = diag_cfg.norm_probe
        self.groups: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():  # tied weights appear once
            self.groups.setdefault(param_group(name), []).append(p)
        self.norms = norm_modules(model)
        # the logits (lm_head's output) are counted with the other logit statistics, sharing |z|
        self.leaves = [m for m in model.modules() if next(m.children(), None) is None
                       and not isinstance(m, (nn.Dropout, nn.Identity)) and m is not model.lm_head]
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.loss_spikes = SpikeScore(diag_cfg.spike_window, diag_cfg.spike_sigma)
        self.grad_norm_spikes = SpikeScore(diag_cfg.spike_window, diag_cfg.spike_sigma)
        self.clipped = self.clip_counted = 0
        self._params_before: list[torch.Tensor] | None = None

    def sampled(self, step: int) -> bool:
        """Whether step `step` (1-based, as logged) samples the diag/* metrics."""
        return self.interval > 0 and (step == 1 or step % self.interval == 0)

    def record(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Keep device scalars for `step` until the next `collect`."""
        self.pending.setdefault(step, {}).update(metrics)

    def drop_after(self, step: int) -> None:
        """Forget what was recorded for steps after `step` (an abandoned step)."""
        self.pending = {s: metrics for s, metrics in self.pending.items() if s <= step}

    def collect(self) -> dict[int, dict[str, float]]:
        """Every recorded value as floats, {step: {name: value}}, fetched in one host sync."""
        if not self.pending:
            return {}
        keys = [(step, name) for step, metrics in self.pending.items() for name in metrics]
        values = torch.stack([self.pending[step][name].float() for step, name in keys]).tolist()
        self.pending = {}
        rows: dict[int, dict[str, float]] = {}
        for (step, name), value in zip(keys, values):
            rows.setdefault(step, {})[name] = value
        return rows

    # ------------------------------------------------------------ sampled steps
    @torch.no_grad()
    def observe_forward(self, step: int, x: torch.Tensor) -> None:
        """Activation statistics of the model on the batch `x` the step is about to train on."""
        stats: dict[str, torch.Tensor] = {}
        overflow: list[torch.Tensor] = []

        def count_overflow(_module, _args, out):
            overflow.append(beyond_fp16(out))

        def residual(i):
            def hook(_module, _args, out):
                stats[f"diag/resid_rms/L{i}"] = rms(out)
                stats[f"diag/resid_var/L{i}"] = residual_variance(out)
                overflow.append(beyond_fp16(out))
            return hook

        def norm_input(name):
            def hook(_module, args):
                stats[f"diag/norm_in_absmax/{name}"] = args[0].abs().amax().float()
            return hook

        handles = [m.register_forward_hook(count_overflow) for m in self.leaves]
        for i, block in enumerate(self.model.blocks):
            handles.append(block.register_forward_hook(residual(i)))
        handles += [norm.register_forward_pre_hook(norm_input(name)) for name, norm in self.norms]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), self.precision.autocast(), \
                    attention_inputs(self.model) as attn_inputs:
                logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()

        for i, h in attn_inputs.items():  # hooks are off: recomputing q, k triggers none of them
            attn = self.model.blocks[i].attn
            q, k = attention_qk(attn, h)
            attention = attention_stats(q, k, attn.attn_softcap)
            stats[f"diag/attn_logit_max/L{i}"] = attention["head_max"].amax()
            stats.update({f"diag/attn_logit_max_head/L{i}/H{head}": m for head, m in enumerate(attention["head_max"])})
            stats[f"diag/attn_entropy/L{i}"], stats[f"diag/attn_sink/L{i}"] = attention["entropy"], attention["sink"]
            stats[f"diag/q_rms/L{i}"], stats[f"diag/k_rms/L{i}"] = rms(q), rms(k)
        z = logits.float()
        z_abs, log_z = z.abs(), torch.logsumexp(z, dim=-1)
        overflow.append(beyond_fp16(logits, z_abs))
        stats.update({"diag/logits_mean": z.mean(), "diag/logits_absmax": z_abs.amax(),
                      "diag/logz_mean": log_z.mean(), "diag/logz_std": log_z.std(correction=0),
                      "amp/overflow_activations": torch.stack(overflow).sum()})
        if self.norm_probe:
            dtype = self.precision.autocast_dtype or torch.float32
            errors = norm_probe_errors(self.model.blocks[0].norm_attn, str(self.model.norm_cfg.kind),
                                       self.model.cfg.d_model, dtype, self.precision.autocast(), x.device)
            stats.update({f"diag/{name}": error for name, error in errors.items()})
        self.record(step, stats)

    @torch.no_grad()
    def observe_gradients(self, step: int) -> None:
        """Per-group gradient RMS (unscaled, before clipping) and parameter RMS; snapshot the parameters."""
        stats = {}
        for group, params in self.groups.items():
            root_n = math.sqrt(sum(p.numel() for p in params))
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                stats[f"diag/grad_rms/{group}"] = group_norm(grads) / root_n
            stats[f"diag/param_rms/{group}"] = group_norm(params) / root_n
        self._params_before = [p.detach().clone() for params in self.groups.values() for p in params]
        self.record(step, stats)

    @torch.no_grad()
    def observe_update(self, step: int) -> None:
        """Per-group RMS of w_after - w_before and ||w_after - w_before|| / ||w_before|| (0 when the step was
        skipped)."""
        before = iter(self._params_before)
        stats = {}
        for group, params in self.groups.items():
            old = [next(before) for _ in params]
            update = group_norm([p - o for p, o in zip(params, old)])
            stats[f"diag/update_rms/{group}"] = update / math.sqrt(sum(p.numel() for p in params))
            stats[f"diag/update_ratio/{group}"] = update / group_norm(old)
        self._params_before = None
        self.record(step, stats)

    # ------------------------------------------------------------ every logged step (host side)
    def on_logged(self, metrics: dict) -> None:
        """Update the spike scores and clip fraction with one step's logged values."""
        self.loss_spikes.update(metrics["train/loss"])
        grad_norm = metrics["optim/grad_norm"]
        self.grad_norm_spikes.update(grad_norm)
        if math.isfinite(grad_norm):
            self.clip_counted += 1
            self.clipped += metrics["optim/clipped"]

    def running_metrics(self) -> dict[str, float]:
        """The scores over every step logged so far."""
        metrics = {"optim/clip_fraction": self.clipped / max(1, self.clip_counted)}
        for name, spikes in (("diag/loss_spike_score", self.loss_spikes),
                             ("diag/grad_norm_spike_score", self.grad_norm_spikes)):
            if spikes.score is not None:
                metrics[name] = spikes.score
        return metrics

    def state_dict(self) -> dict:
        return {"loss_spikes": self.loss_spikes.state_dict(), "grad_norm_spikes": self.grad_norm_spikes.state_dict(),
                "clipped": self.clipped, "clip_counted": self.clip_counted}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.loss_spikes.load_state_dict(state["loss_spikes"])
        self.grad_norm_spikes.load_state_dict(state["grad_norm_spikes"])
        self.clipped, self.clip_counted = state["clipped"], state["clip_counted"]
