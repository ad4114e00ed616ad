"""fp8 training of the transformer's linear layers with torchao's float8 recipes.

    tensorwise  one dynamic scale per tensor: input and weight in e4m3, gradients in e5m2
    rowwise     one scale per row (per token for inputs and gradients, per output feature for
                weights), rounded down to a power of two; e4m3 throughout

`convert_to_fp8` swaps every nn.Linear except the LM head for torchao's Float8Linear (the head
stays in the autocast dtype, as torchtitan does: the logits are the most precision-sensitive
matmul, and the vocabulary need not be a multiple of 16). Attention and norms are untouched and
run in bf16 under the trainer's autocast, as the recipe prescribes. Parameters keep their names
and objects, so checkpoints and optimizers are unaffected.

Where the hardware has fp8 tensor cores (CUDA compute capability >= 8.9; >= 9.0 for rowwise,
whose CUTLASS kernel is sm90-only) the matmuls are torch._scaled_mm. Elsewhere they are
emulated with the same recipe: torchao's own cast code computes the same scales and fp8
values, and the matmul runs on the dequantized operands in fp32 (`EmulatedFloat8Linear`).
"""

import dataclasses
import functools
import logging
import sys

import torch
from torch import nn

FP8_RECIPES = ("tensorwise", "rowwise")
TORCHAO_PIN = "torchao==0.18.0"
_MIN_CAPABILITY = {"tensorwise": (8, 9), "rowwise": (9, 0)}
_MATMUL_MULTIPLE = 16  # torch._scaled_mm: every dim of the fp8 operands but the output rows


def _import_torchao_float8():
    # A CPU build of torch cannot load torchao's CUDA extensions and torchao logs one warning per
    # file; float8 training does not use them (its matmul is torch._scaled_mm).
    # Importing torchao also makes torch warn once that registering an enum with pytree is deprecated.
    loggers = [logging.getLogger("torch.utils._pytree")]
    if torch.version.cuda is None:
        loggers.append(logging.getLogger("torchao"))
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.float8
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return torchao.float8


def fp8_path(device: torch.device, recipe: str) -> str:
    """Which path fp8 matmuls take on `device`: 'torchao-float8 (cuda)' or 'emulated (<device type>)'."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY[recipe]:
        return "torchao-float8 (cuda)"
    return f"emulated ({device.type})"


def converts(module_name: str, module: nn.Module) -> bool:
    """Whether `convert_to_fp8` makes this module an fp8 linear: every nn.Linear but the LM head and the
    gates (model.attn_gate, value embeddings, smear: a few outputs each, too narrow for fp8 matmuls)."""
    return isinstance(module, nn.Linear) and module_name != "lm_head" and not module_name.endswith("gate")


def fp8_unavailable_reason(model_cfg, recipe: str, tokens_per_micro_batch: int) -> str | None:
    """Why fp8 training cannot run this model (one line with the fix), or None if it can.

    The shape rules are those of the fp8 kernels and are checked on every device, so that a
    config that trains here (emulated) also trains on a GPU, with the same numerics.
    """
    if recipe not in FP8_RECIPES:
        return f"fp8 recipe {recipe!r} is not one of {', '.join(FP8_RECIPES)}"
    if torch.__version__ < "2.11":
        return f"fp8 needs torch >= 2.11 (what {TORCHAO_PIN} is built for), found {torch.__version__}"
    try:
        _import_torchao_float8()
    except ImportError:
        return f"fp8 needs torchao: pip install '{TORCHAO_PIN}'"
    if model_cfg.d_model % _MATMUL_MULTIPLE:
        return (f"model.d_model={model_cfg.d_model} is not a multiple of {_MATMUL_MULTIPLE}: fp8 matmuls need every "
                f"converted linear's in and out features divisible by {_MATMUL_MULTIPLE}; pick such a d_model")
    kv_features = (model_cfg.n_kv_head or model_cfg.n_head) * (model_cfg.d_model // model_cfg.n_head)
    if kv_features % _MATMUL_MULTIPLE:
        return (f"model.n_kv_head x head size = {kv_features} key/value features is not a multiple of "
                f"{_MATMUL_MULTIPLE}: the fp8 qkv matmul's out features must be; pick more kv heads or a wider head")
    if tokens_per_micro_batch % _MATMUL_MULTIPLE:
        return (f"train.batch_size x model.block_size = {tokens_per_micro_batch} tokens is not a multiple of "
                f"{_MATMUL_MULTIPLE}: the fp8 weight-gradient matmul contracts over the tokens of a micro-batch")
    return None


@functools.cache
def _emulated_float8_linear():
    from torchao.float8.float8_linear import Float8Linear

    class EmulatedFloat8Linear(Float8Linear):
        """torchao's emulated Float8Linear, made to follow the CUDA path under any device's autocast.

        Float8Linear casts its input only to the *CUDA* autocast dtype (under CPU autocast its
        scales would come from the fp32 input), and its emulated matmul is a torch.mm that
        autocast would run in bf16. Here the input is cast to the autocast dtype first, as on
        CUDA, and the matmul of the dequantized operands runs in fp32.
        """

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            device_type = input.device.type
            if not torch.is_autocast_enabled(device_type):
                return super().forward(input)
            input = input.to(torch.get_autocast_dtype(device_type))
            with torch.autocast(device_type, enabled=False):
                return super().forward(input)

    return EmulatedFloat8Linear


def convert_to_fp8(model: nn.Module, recipe: str, device: torch.device) -> list[str]:
    """Swap the model's linears (not the LM head) for fp8 linears in place, on the path
    `fp8_path(device, recipe)` names; returns the converted module names. Call it after the
    model is on `device` and before building the optimizer, DDP and torch.compile."""
    float8 = _import_torchao_float8()
    emulate = fp8_path(device, recipe).startswith("emulated")
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    names = [name for name, module in model.named_modules() if converts(name, module)]
    float8.convert_to_float8_training(model, module_filter_fn=lambda module, name: name in names, config=config)
    if emulate:
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, _emulated_float8_linear().from_float(getattr(owner, child), config=config))
    return names


def fp8_casts(module: nn.Module) -> dict | None:
    """For an fp8 linear: {tensor class: (fp8 dtype, x -> the recipe's scale for x)} for its
    input ('act_in'), weight and output gradient ('grad'); None for any other module.
    The scale has x's shape with a 1 in place of the scaled-over dim (rowwise) or is a scalar."""
    loaded = sys.modules.get("torchao.float8.float8_linear")  # no module is an fp8 linear before this
    if loaded is None or not isinstance(module, loaded.Float8Linear):
        return None
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_utils import tensor_to_scale

    config = module.config

    def cast(cast_config):
        rowwise = cast_config.scaling_granularity is ScalingGranularity.AXISWISE

        def scale(x: torch.Tensor) -> torch.Tensor:
            # a row is the last dim of the input (B, T, in), the weight (out, in) and the gradient (B, T, out)
            return tensor_to_scale(x, cast_config.target_dtype, scaling_granularity=cast_config.scaling_granularity,
                                   axiswise_dim=-1 if rowwise else None,
                                   round_scales_to_power_of_2=config.round_scales_to_power_of_2)
        return cast_config.target_dtype, scale

    return {"act_in": cast(config.cast_config_input), "weight": cast(config.cast_config_weight),
            "grad": cast(config.cast_config_grad_output)}
