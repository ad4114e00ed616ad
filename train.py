"""Train a small GPT.  python train.py [group=option ...] [key=value ...]

    python train.py                                   # embedded default (CPU or GPU)
    python train.py norm=rmsnorm precision=bf16       # one ablation arm
    python train.py -m norm=layernorm,rmsnorm seed=0,1,2

Config lives in configs/ (Hydra) with its typed schema in minilm/config.py; minilm/launch/cli.py
checks every job before any starts, and minilm/train/loop.py is where a run happens.
"""

from minilm.launch.cli import main

if __name__ == "__main__":
    main()
