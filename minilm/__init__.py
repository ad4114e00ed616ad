"""minilm: a miniature mixed-precision transformer training framework."""

from omegaconf import OmegaConf

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken

__version__ = "0.1.0"

cap_onednn_isa_if_amx_is_broken()  # before oneDNN initializes anywhere in this process

# Multirun job dirs are named after their overrides (configs/hydra/default.yaml); clipping keeps a
# long command line under the filesystem's 255-byte name limit (the job number keeps names unique).
# Registered on import of the package so every process that runs a job has it, Slurm workers too.
OmegaConf.register_new_resolver(
    "minilm.clip", lambda text, limit: str(text).encode()[: int(limit)].decode(errors="ignore"), replace=True)
