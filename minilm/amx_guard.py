"""Work around virtual machines that advertise Intel AMX but do not enable it.

oneDNN runs bf16 matmuls on AMX tiles whenever /proc/cpuinfo lists `amx_tile`.
Some hypervisors pass the flag through without enabling the tile state, and the
first CPU bf16 matmul then dies with SIGILL ("Illegal instruction"). We probe
once in a child process (result cached per kernel + CPU + torch) and, if the
probe dies, cap oneDNN at AVX-512 before it initializes in this process.
"""

import hashlib
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

_PROBE = ("import torch; a = torch.randn(64, 64); "
          "torch.nn.functional.linear(a.bfloat16(), a.bfloat16())")
_SAFE_ISA = "AVX512_CORE_BF16"


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cap_onednn_isa_if_amx_is_broken() -> None:
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or platform.system() != "Linux":
        return
    cpuinfo = _cpu_flags()
    if "amx_tile" not in cpuinfo:
        return
    import importlib.metadata

    key = hashlib.sha1(f"{platform.release()}|{cpuinfo}|{importlib.metadata.version('torch')}".encode()).hexdigest()
    marker = Path(os.path.expanduser("~/.cache/minilm")) / f"amx-probe-{key[:16]}"
    try:
        verdict = marker.read_text()
    except OSError:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=300,
                                env={**os.environ, "ONEDNN_MAX_CPU_ISA": ""})
        verdict = "broken" if result.returncode == -signal.SIGILL else "ok"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(verdict)
        except OSError:
            pass
    if verdict == "broken":
        os.environ["ONEDNN_MAX_CPU_ISA"] = _SAFE_ISA
