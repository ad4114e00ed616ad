"""`minilm-replay BUNDLE`: replay the step a forensics bundle captured (minilm/train/forensics.py)."""

import argparse
from pathlib import Path

import torch

from minilm import checkpoint
from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.errors import exit_on_input_error
from minilm.train.forensics import replay_step


def replay(argv: list[str] | None = None) -> int:
    """Replay the step a bundle captured and say what went non-finite first. Exit status 0 when the
    replay reproduces a non-finite value, 1 when the step comes out clean (e.g. it depended on
    nondeterministic kernels)."""
    parser = argparse.ArgumentParser(description=replay.__doc__)
    parser.add_argument("bundle", type=Path, help="a forensics/step_XXXXXX.pt file from a run dir")
    parser.add_argument("--device", help="where to replay (default: the run's device if present here, else cpu)")
    args = parser.parse_args(argv)

    bundle = checkpoint.load(args.bundle)
    recorded = torch.device(bundle["device"])
    device = torch.device(args.device) if args.device else (
        recorded if recorded.type == "cpu" or torch.cuda.is_available() else torch.device("cpu"))
    print(f"bundle {args.bundle}: step {bundle['step']} (rank {bundle['rank']}), "
          f"precision {bundle['config']['precision']['name']}, lr {bundle['lr']:.3g}, "
          f"{len(bundle['batches'])} micro-batch(es)")
    print(f"recorded during training: loss {bundle['loss']}, grad norm {bundle['grad_norm']}; first non-finite "
          f"module output {bundle['live_first_nonfinite_module'] or bundle['first_nonfinite_module']}, "
          f"gradient {bundle['first_nonfinite_grad']}")
    if not bundle["pre_step_weights"]:
        print("note: the step's gradients were finite, so its update was applied: the weights are post-step")

    result = replay_step(bundle, device, anomaly=True)
    print(f"\nreplay on {device} under torch.autograd.detect_anomaly(check_nan=True):")
    print(f"  loss {result['loss']}, grad norm {result['grad_norm']}")
    print(f"  non-finite parameters before the step: {', '.join(result['nonfinite_params']) or 'none'}")
    print(f"  first non-finite module output (forward): {result['first_nonfinite_module'] or 'none'}")
    print(f"  first non-finite gradient (backward): {result['first_nonfinite_grad'] or 'none'}")
    print(f"  anomaly: {result['anomaly'] or 'none'}")
    if result["anomaly_forward_trace"]:
        print("  " + result["anomaly_forward_trace"].strip().replace("\n", "\n  "))
    print(f"\nreproduced: {'yes' if result['reproduced'] else 'no, the step is clean on replay'}")
    return 0 if result["reproduced"] else 1


def main(argv: list[str] | None = None) -> int:
    """`minilm-replay` / scripts/replay.py."""
    cap_onednn_isa_if_amx_is_broken()  # before any bf16 matmul in this process
    return exit_on_input_error(replay, argv)
