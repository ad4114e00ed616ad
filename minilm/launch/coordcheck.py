"""`minilm-coordcheck`: μP's coordinate check (Yang et al. 2022, section 5) for any config.

    minilm-coordcheck model.parametrization=mup                        # AdamW, default shape
    minilm-coordcheck model=modern optim=muon model.parametrization=sp --widths 64 128 256 512 --steps 10

Trains the config at each width (model.d_model; n_head fixed, so it must divide every width) for a few
steps at the constant peak LR optim.lr (no warmup or decay, as the check is made), on the same batches from
the same seed, and records each layer's activation RMS on every step's batch before that step's update
(step 0: the init): the embedding output (after the embedding norm), each block's attention output, MLP
output and residual stream, and the logits (the head's output, before a soft-cap). Writes
`coordcheck.json` (the RMS per layer, step and width, and each layer's log-log slope against width per
step) and `coordcheck.png` (a panel per representative layer: RMS against width, log-log, a line per
step). Under SP the hidden activations' RMS grows with width once the weights have moved; under μP it
stays flat (slope near 0): that is what μP is for.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.config import check_runnable, resolve_device, validate
from minilm.data import TokenWindowSampler, prepare_data
from minilm.errors import ConfigError, exit_on_input_error
from minilm.launch.cli import compose
from minilm.model import lm_loss
from minilm.optim import build_optimizer, set_schedule
from minilm.precision.policy import Precision
from minilm.seeding import seed_everything
from minilm.train.build import build_model

CONSTANT_LR = ["optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]  # the user's overrides come after these


def width_configs(overrides: list[str], widths: list[int]) -> list:
    """The config at each width, every one validated before anything trains."""
    configs = []
    for width in widths:
        job = [*CONSTANT_LR, *overrides, f"model.d_model={width}"]
        cfg = compose(job)
        validate(cfg)
        check_runnable(cfg, resolve_device(cfg.device))
        configs.append(cfg)
    return configs


def layer_modules(model) -> dict[str, torch.nn.Module]:
    """The modules whose outputs are the coordinates checked, by layer name."""
    layers = {"embedding": model.drop}  # after the embedding (and its norm)
    for i, block in enumerate(model.blocks):
        layers |= {f"L{i}.attn": block.attn, f"L{i}.mlp": block.mlp, f"L{i}.residual": block}
    return layers | {"logits": model.lm_head}


def activation_rms(cfg, data, steps: int) -> dict[str, list[float]]:
    """Each layer's activation RMS on every step's batch, before the step's update, training `cfg`."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    precision = Precision(OmegaConf.to_object(cfg.precision), device)
    model = build_model(cfg, data.vocab_size, precision)
    optim_cfg = OmegaConf.to_object(cfg.optim)
    optimizer = build_optimizer(model, optim_cfg, precision, cfg.seed)
    sampler = TokenWindowSampler(data.train, cfg.model.block_size, cfg.train.batch_size, cfg.seed, 0, 1)
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    rms: dict[str, list[float]] = {name: [] for name in layer_modules(model)}

    def record(name):
        return lambda module, inputs, output: rms[name].append(output.detach().float().pow(2).mean().sqrt().item())

    handles = [module.register_forward_hook(record(name)) for name, module in layer_modules(model).items()]
    try:
        for step in range(steps):
            set_schedule(optimizer, step, optim_cfg, cfg.train.max_steps)
            x, y = (t.to(device) for t in sampler.next_batch())
            with precision.autocast():
                logits = model(x)
            precision.backward(lm_loss(logits, y, optim_cfg.z_loss).loss)
            precision.unscale_(optimizer)
            precision.step(optimizer, precision.clip_grad_norm(list(model.parameters()), clip))
            optimizer.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return rms


def slope(widths: list[int], values: list[float]) -> float:
    """The least-squares slope of log(value) against log(width)."""
    x, y = [math.log(w) for w in widths], [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def coord_check(overrides: list[str], widths: list[int], steps: int) -> dict:
    """Train every width; the record coordcheck.json holds."""
    configs = width_configs(overrides, widths)
    data = prepare_data(configs[0].data, configs[0].paths.cache_dir)
    by_width = [activation_rms(cfg, data, steps) for cfg in configs]
    layers = list(by_width[0])
    rms = {name: [[run[name][step] for run in by_width] for step in range(steps)] for name in layers}
    return {"overrides": list(overrides), "parametrization": str(configs[0].model.parametrization),
            "optimizer": str(configs[0].optim.name), "lr": configs[0].optim.lr, "widths": widths, "steps": steps,
            "rms": rms,  # rms[layer][step][width index]
            "slope": {name: [slope(widths, per_step) for per_step in rms[name]] for name in layers}}


def representative(layers: list[str]) -> list[str]:
    """The layers drawn: the embedding, the first and last block's outputs, the last residual, the logits."""
    blocks = sorted({name.split(".")[0] for name in layers if name.startswith("L")}, key=lambda b: int(b[1:]))
    first, last = blocks[0], blocks[-1]
    names = ["embedding", f"{first}.attn", f"{first}.mlp", f"{last}.attn", f"{last}.mlp", f"{last}.residual",
             "logits"]
    return list(dict.fromkeys(name for name in names if name in layers))


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = representative(list(record["rms"]))
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    colors = plt.get_cmap("viridis")
    for ax, name in zip(axes[0], names):
        for step, values in enumerate(record["rms"][name]):
            ax.plot(record["widths"], values, marker=".", color=colors(step / max(1, record["steps"] - 1)),
                    label=f"step {step}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name}\nslope {record['slope'][name][-1]:+.2f}", fontsize=9)
        ax.set_xlabel("width (d_model)")
    axes[0][0].set_ylabel("activation RMS")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(f"coordinate check: {record['parametrization']}, optim={record['optimizer']}, "
                 f"lr={record['lr']:g} (slopes at step {record['steps'] - 1})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minilm-coordcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as train.py takes them")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=10, help="training steps per width (default 10)")
    parser.add_argument("--out", type=Path, default=Path("coordcheck"), help="the folder for the JSON and PNG")
    args = parser.parse_args(argv)
    if len(args.widths) < 2 or min(args.widths) < 1:
        raise ConfigError(f"--widths {' '.join(map(str, args.widths))} is not valid; pass two or more widths >= 1")
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps} is not valid; pass at least 1")
    record = coord_check(args.overrides, sorted(args.widths), args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coordcheck.json").write_text(json.dumps(record, indent=1))
    plot(record, args.out / "coordcheck.png")
    last = {name: f"{values[-1]:+.2f}" for name, values in record["slope"].items()}
    print(f"log-log slope of activation RMS against width at step {args.steps - 1}: {last}")
    print(f"wrote {args.out / 'coordcheck.json'} and {args.out / 'coordcheck.png'}")
    return 0


def main(argv: list[str] | None = None) -> None:
    cap_onednn_isa_if_amx_is_broken()  # before any bf16 matmul in this process
    sys.exit(exit_on_input_error(run, argv))
