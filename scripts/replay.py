"""Replay the step a forensics bundle captured and say what went non-finite first.

    python scripts/replay.py outputs/<run>/forensics/step_000123.pt [--device cpu]

The model, loss scale and RNG are restored to their state just before the step, and the step's
batches run forward and backward under torch.autograd.detect_anomaly(check_nan=True). Printed:
the parameters that were already non-finite, the first module whose output was non-finite
(forward hooks, in execution order), and the first backward operation that returned NaN with
the forward call that created it. Exit status 0 when the replay reproduces a non-finite value,
1 when the step comes out clean (e.g. it depended on nondeterministic kernels).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from minilm import checkpoint  # noqa: E402
from minilm.forensics import replay_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    sys.exit(main())
