"""Work around virtual machines that advertise Intel AMX but do not enable it.

oneDNN runs CPU bf16 matmuls on AMX tiles whenever the CPU flags list `amx_tile`. Some
hypervisors pass the flag through without enabling the tile state, and the first bf16
matmul then dies with SIGILL ("Illegal instruction"). `cap_onednn_isa_if_amx_is_broken`
probes once in a child process (the verdict is cached per kernel, CPU flags and torch
version) and, if the probe dies, caps oneDNN at AVX-512 before it initializes in this
process. The entry points call it first; setting ONEDNN_MAX_CPU_ISA yourself skips it.
It never raises: a probe that cannot run leaves oneDNN as it is.
"""

import hashlib
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

_PROBE = ("import torch; a = torch.randn(64, 64); "
          "torch.nn.functional.linear(a.bfloat16(), a.bfloat16())")
_SAFE_ISA = "AVX512_CORE_BF16"
_PROBE_TIMEOUT_S = 120


def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo (what the CPU advertises; unlike the MHz lines, it never changes)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _probe_dies_of_sigill() -> bool | None:
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=_PROBE_TIMEOUT_S,
                                env={**os.environ, "ONEDNN_MAX_CPU_ISA": ""})
    except (OSError, subprocess.SubprocessError):
        return None  # no verdict: leave oneDNN alone
    return result.returncode == -signal.SIGILL


def cap_onednn_isa_if_amx_is_broken() -> None:
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or platform.system() != "Linux":
        return
    flags = cpu_flags()
    if "amx_tile" not in flags:
        return
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return
    key = hashlib.sha1(f"{platform.release()}|{flags}|{torch_version}".encode()).hexdigest()[:16]
    marker = Path.home() / ".cache" / "minilm" / f"amx-probe-{key}"
    try:
        verdict = marker.read_text()
    except OSError:
        broken = _probe_dies_of_sigill()
        if broken is None:
            return
        verdict = "broken" if broken else "ok"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(verdict)
        except OSError:
            pass
    if verdict == "broken":
        os.environ["ONEDNN_MAX_CPU_ISA"] = _SAFE_ISA
