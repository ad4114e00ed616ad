"""A config made into the parts a run trains with: the model, and its wrapping for data parallel and
torch.compile (the optimizer and its schedule: minilm/optim/); the process group of a data-parallel run.

A run, an ensemble's members and a replayed bundle (forensics) build the same way from here.
"""

import os

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from minilm.model import GPT
from minilm.precision.policy import Precision


def build_model(cfg, vocab_size: int, precision: Precision) -> GPT:
    """The run's GPT on the precision's device, in the precision's number formats."""
    model = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), vocab_size)
    return precision.prepare_model(model.to(precision.device))


def compile_mode(cfg) -> str | None:
    """torch.compile's mode for train.compile_mode (None: its default)."""
    return None if cfg.train.compile_mode == "default" else str(cfg.train.compile_mode)


def compiled(fn, cfg):
    """`fn` (a module or a function) under torch.compile when train.compile is on, else `fn` itself."""
    if not cfg.train.compile:
        return fn
    return torch.compile(fn, backend=cfg.train.compile_backend, mode=compile_mode(cfg))


def wrap_model(model: torch.nn.Module, cfg, device: torch.device, world_size: int) -> torch.nn.Module:
    """What the training step calls: the model under DDP (more than one rank), then torch.compile."""
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return compiled(model, cfg)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """This process's rank, the world size and its device: under torchrun (WORLD_SIZE > 1) after joining the
    process group (nccl on CUDA, else gloo), each rank on its own GPU (LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return rank, world_size, device


def rank0s(value, world_size: int):
    """Rank 0's `value` (any picklable), on every rank."""
    if world_size == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
