"""Whether the Triton norm kernels can run here, and if not, one line saying why and what to do.

Importing this module never imports triton; the Triton kinds are probed on first ask.
"""

import os

_FALLBACK = "pick norm=layernorm / norm=rmsnorm"


def triton_interpreted() -> bool:
    """Whether the Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1 when they were defined)."""
    from triton.runtime.interpreter import InterpretedFunction

    from minilm.norms import triton_kernels

    return isinstance(triton_kernels.norm_fwd_fused_kernel, InterpretedFunction)


def triton_unavailable_reason(device_type: str) -> str | None:
    """One line saying why the Triton norms cannot run on `device_type`, with the fix; None if they can."""
    try:
        interpreted = triton_interpreted()
    except ImportError as error:
        return f"triton is not importable ({error}): pip install triton (Linux), or {_FALLBACK}"
    if device_type == "cuda":
        import torch

        return None if torch.cuda.is_available() else f"Triton norms need a CUDA GPU and none is visible; {_FALLBACK}"
    if device_type == "cpu":
        if interpreted:
            return None
        hint = " before anything imports triton" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        return (f"Triton norms need a CUDA GPU; on CPU set TRITON_INTERPRET=1{hint} (slow, for testing) "
                f"or {_FALLBACK}")
    return f"Triton norms run on CUDA GPUs, not {device_type!r}; {_FALLBACK}"

