"""Numerics telemetry: how much of each tensor a low-precision format loses, per layer.

For a tensor and a format (fp16, bf16, float8_e4m3fn, float8_e5m2), `format_stats` counts,
in fp32 on the values *before* the cast (times the fp8 scale, where the format has one),
with s = the format's smallest subnormal, n = its smallest normal, m = its largest finite:

    underflow  0 < |x| <= s/2          rounds to zero (round-to-nearest-even: s/2 is a tie,
                                       and 0 is the even neighbour)
    subnormal  s/2 < |x| < n - s/2     rounds to a subnormal (n - s/2 is a tie that goes to
                                       n, the even neighbour), so it keeps fewer significant bits
    overflow   |x| >= m + u/2,         rounds past the largest finite value: becomes inf (fp16, bf16)
               inf or nan              or is clamped to m with more than rounding's error (fp8 casts
                                       saturate); u is the spacing of the format's values at m. Values
                                       in (m, m + u/2) round to m as any value rounds to its neighbour:
                                       a dynamic fp8 scale maps a tensor's amax onto m, and fp32
                                       rounding of x * scale may land it just above m

each as a fraction of the tensor's nonzero elements (nan counts as nonzero), and the amax
max|x| of the unscaled values (nan if any value is nan). Everything stays a device tensor: the
trainer fetches them with its other sampled metrics in one host sync.

`NumericsCollector` measures, on a sampled step, every nn.Linear of the model in the format
that the run's precision actually casts it to:

    act_in  the linear's input     weight  its weight     grad  the gradient of its output
                                                                (what the backward matmuls consume;
                                                                under fp16 multiplied by the loss scale)

    precision  fp32 -> bf16 (no cast happens: what bf16 would lose), fp16 -> fp16,
               bf16 and bf16_pure -> bf16, fp8 -> each converted linear's recipe formats and
               scales (tensorwise: e4m3 / e4m3 / e5m2; rowwise: e4m3 throughout), bf16 for the
               layers it leaves unconverted (the LM head)

under metric names `numerics/<class>/<stat>/<layer>`, stat in underflow, subnormal, overflow,
amax, and for fp8 layers scale (tensorwise: the one scale; rowwise: the smallest row scale),
layer `L{i}.attn.qkv`, `L{i}.attn.proj`, `L{i}.mlp.fc`, `L{i}.mlp.proj`, `head`.
Like minilm.train.diagnostics it runs the eager model once more on the step's first micro-batch
(same autocast, forked RNG so dropout draws the training masks and the training stream is
untouched), here forward and backward, and takes the gradients with torch.autograd.grad: no
parameter's .grad is touched, so training is bitwise the same with telemetry on or off.

Before the cast, under autocast: in this pass each (non-fp8) linear's output is kept in fp32,
so what follows it in fp32 (residual adds, GELU, the loss) and its gradient stay unrounded
until the linear's own cast: the linears' inputs from norms and GELU, and the gradients
arriving from the residual stream, GELU and the loss, are seen before they are rounded. A
value that a low-precision kernel produces (a matmul's or the attention's output, forward or
backward) is that kernel's rounded output, whose underflows are already zeros: notably the
attention output (act_in of L{i}.attn.proj) and the gradient of L{i}.attn.qkv. fp8 layers are
measured exactly where the recipe casts: the bf16 input, the fp32 weight and the bf16 output
gradient, times their scales. bf16_pure has no cast: every tensor is natively bf16, so its
underflows show only as zeros (not counted) and the subnormal fraction is what remains.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from minilm.model import lm_loss
from minilm.train.diagnostics import param_group

FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16,
           "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# The format each precision casts matmul operands to (fp32 casts nothing: report bf16's view).
PRECISION_FORMATS = {"fp32": torch.bfloat16, "fp16": torch.float16, "bf16": torch.bfloat16,
                     "bf16_pure": torch.bfloat16, "fp8": torch.bfloat16}
TENSOR_CLASSES = ("act_in", "weight", "grad")


def format_thresholds(dtype: torch.dtype) -> tuple[float, float, float]:
    """(underflow_max, subnormal_max, overflow_min) of `dtype`, as in the module docstring."""
    info = torch.finfo(dtype)
    smallest_subnormal = info.tiny * info.eps  # eps = 2^-mantissa_bits
    spacing_at_max = 2.0 ** math.floor(math.log2(info.max)) * info.eps
    return smallest_subnormal / 2, info.tiny - smallest_subnormal / 2, info.max + spacing_at_max / 2


def format_stats(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Underflow, subnormal and overflow fractions (of the nonzero elements) of `x * scale` cast
    to `dtype`, and the amax of `x`: fp32 device scalars, no host sync."""
    x = x.detach().float()
    magnitude = x.abs() if scale is None else (x * scale).abs()
    underflow_max, subnormal_max, overflow_min = format_thresholds(dtype)
    # four counts of magnitude below a threshold (one comparison pass each) give all three
    zeros = torch.count_nonzero(magnitude == 0)
    rounds_to_zero = torch.count_nonzero(magnitude <= underflow_max)
    below_normal = torch.count_nonzero(magnitude < subnormal_max)
    finite_in_range = torch.count_nonzero(magnitude < overflow_min)  # nan compares false
    nonzero = (x.numel() - zeros).clamp(min=1).float()
    return {
        "underflow": (rounds_to_zero - zeros) / nonzero,
        "subnormal": (below_normal - rounds_to_zero) / nonzero,
        "overflow": (x.numel() - finite_in_range) / nonzero,
        "amax": magnitude.amax() if scale is None else x.abs().amax(),
    }


def linear_layer_name(module_name: str) -> str:
    """blocks.0.attn.qkv -> L0.attn.qkv, lm_head -> head: the diagnostics' groups, plus the linear's name."""
    group = param_group(f"{module_name}.weight")
    return f"{group}.{module_name.rsplit('.', 1)[-1]}" if module_name.startswith("blocks.") else group


ScaleFn = Callable[[torch.Tensor], torch.Tensor]


class NumericsCollector:
    """Per-layer format statistics of every nn.Linear's input, weight and output gradient."""

    def __init__(self, model: nn.Module, precision: str):
        from minilm.precision.fp8 import fp8_casts  # torchao is imported only for converted layers

        self.model = model
        self.default_format = PRECISION_FORMATS[precision]
        # per linear: {class: (format, fp8 scale function or None)}
        self.linears: list[tuple[str, nn.Module, dict[str, tuple[torch.dtype, ScaleFn | None]]]] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                casts = fp8_casts(module) or {c: (self.default_format, None) for c in TENSOR_CLASSES}
                self.linears.append((linear_layer_name(name), module, casts))

    def _stats(self, tensor_class: str, layer: str, x: torch.Tensor, cast) -> dict[str, torch.Tensor]:
        dtype, scale_fn = cast
        scale = None if scale_fn is None else scale_fn(x)
        stats = format_stats(x, dtype, scale)
        if scale is not None:
            stats["scale"] = scale.amin()
        return {f"numerics/{tensor_class}/{stat}/{layer}": value for stat, value in stats.items()}

    def observe(self, x: torch.Tensor, y: torch.Tensor, autocast,
                scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> dict[str, torch.Tensor]:
        """Metrics of one forward + backward of the model on (x, y) under the context `autocast()`;
        `scale_loss` is the loss scaling the run applies (fp16: the GradScaler's `scale`)."""
        metrics: dict[str, torch.Tensor] = {}
        outputs: dict[str, tuple[torch.Tensor, tuple]] = {}

        def hooks(layer, casts):
            def before(_module, args):
                inp = args[0]
                if casts["act_in"][1] is not None and torch.is_autocast_enabled(inp.device.type):
                    inp = inp.to(torch.get_autocast_dtype(inp.device.type))  # fp8 scales the autocast input
                with torch.no_grad():
                    metrics.update(self._stats("act_in", layer, inp, casts["act_in"]))

            def after(_module, _args, out):
                if casts["grad"][1] is None and torch.is_autocast_enabled(out.device.type):
                    out = out.float()  # so the gradient arriving here is seen before autograd casts it
                outputs[layer] = (out, casts["grad"])
                return out
            return before, after

        handles = []
        for layer, module, casts in self.linears:
            before, after = hooks(layer, casts)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                with autocast():
                    logits = self.model(x)
                loss = scale_loss(lm_loss(logits, y).loss)
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.autograd.grad(loss, [out for out, _ in outputs.values()])
        with torch.no_grad():
            for (layer, (_, cast)), grad in zip(outputs.items(), grads):
                metrics.update(self._stats("grad", layer, grad, cast))
            for layer, module, casts in self.linears:
                metrics.update(self._stats("weight", layer, module.weight, casts["weight"]))
        return metrics
