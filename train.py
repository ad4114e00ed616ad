"""Train a small GPT.  python train.py [group=option ...] [key=value ...]

    python train.py                                   # embedded default (CPU or GPU)
    python train.py norm=rmsnorm precision=bf16       # one ablation arm
    python train.py -m norm=layernorm,rmsnorm seed=0,1,2

Config lives in configs/ (Hydra); everything below this file is plain Python
(minilm/trainer.py is where a run happens).
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from minilm.cli import CONFIG_DIR, CONFIG_NAME, preflight
from minilm.trainer import train


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def main(cfg) -> float | None:
    hydra_cfg = HydraConfig.get()
    summary = train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    return summary.get("val/loss")  # what Hydra sweepers optimize


if __name__ == "__main__":
    error = preflight(sys.argv[1:])
    if error:
        sys.exit(f"error: {error}")
    main()
