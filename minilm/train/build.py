"""A config made into the parts a run trains with: the model and the compile mode (the optimizer and its
schedule: minilm/optim/).

The trainer, an ensemble's members and a replayed bundle (forensics) build the same way from here.
"""

from omegaconf import OmegaConf

from minilm.model import GPT
from minilm.precision.policy import Precision


def build_model(cfg, vocab_size: int, precision: Precision) -> GPT:
    """The run's GPT on the precision's device, in the precision's number formats."""
    model = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), vocab_size)
    return precision.prepare_model(model.to(precision.device))


def compile_mode(cfg) -> str | None:
    """torch.compile's mode for train.compile_mode (None: its default)."""
    return None if cfg.train.compile_mode == "default" else str(cfg.train.compile_mode)
