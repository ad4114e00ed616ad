"""hydra/launcher=ensemble: a multirun's jobs that share an architecture train as batched ensembles.

    python train.py -m experiment=lr_qknorm size=tiny hydra/launcher=ensemble

Hydra runs plugins only from the `hydra_plugins` package, so the launcher lives here; the work is in
minilm/train/ensemble.py. Every job is composed first and grouped by `minilm.train.ensemble.ensemble_key` (what the
batched forward and backward share); a group larger than memory allows (an estimate per member against
the device's free memory, and hydra.launcher.max_members) is split. The plan is printed before anything
starts. Each member gets its job dir, `.hydra/` files and Hydra callbacks exactly as a job run alone
(Hydra's own `run_job` makes them), then the group trains as one `Ensemble`. Jobs that cannot be batched
(minilm.train.ensemble.unbatchable_reason) and groups of one run alone, as with the basic launcher.

With hydra.launcher.n_jobs=N > 1 the units (ensembles and runs alone) train N at a time, each in a process
of its own with cores / N CPU threads, and every group is split into at least N ensembles so that the
processes have work alike: on a GPU, more kernels in flight; on a CPU, a thread per core each.
"""

import logging
import math
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from minilm.config import check_ensemble_launcher
from minilm.errors import input_errors
from minilm.launch.jobs import job_result, threads_per_job

log = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


class EnsembleLauncher(Launcher):
    def __init__(self, max_members, memory_fraction, n_jobs) -> None:  # minilm.config.EnsembleLauncherConfig
        check_ensemble_launcher(n_jobs, max_members, memory_fraction)
        self.max_members, self.memory_fraction, self.n_jobs = max_members, memory_fraction, n_jobs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + idx
            configs.append(sweep_config)
        units = self.plan(configs, job_overrides, initial_job_idx)
        if self.n_jobs > 1:
            return self._launch_side_by_side(units, configs, initial_job_idx)
        runs: dict[int, JobReturn] = {}
        for unit in units:
            if len(unit) == 1:
                runs[unit[0]] = self._run(configs[unit[0]], self.task_function)
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            else:
                runs.update(zip(unit, self._run_ensemble([configs[i] for i in unit], f"#{initial_job_idx + unit[0]}")))
        return [runs[i] for i in range(len(configs))]

    def plan(self, configs: list[DictConfig], job_overrides, first: int) -> list[list[int]]:
        """Group the jobs (indices into `configs`), split groups to fit memory, print the plan."""
        import torch

        from minilm.config import resolve_device
        from minilm.train.ensemble import available_bytes, ensemble_key, member_bytes, split, unbatchable_reason

        groups: dict[tuple, list[int]] = {}
        alone: dict[int, str] = {}
        for i, cfg in enumerate(configs):
            task = task_config(cfg)
            reason = unbatchable_reason(task)
            if reason:
                alone[i] = reason
            else:
                groups.setdefault(ensemble_key(task), []).append(i)
        units: list[list[int]] = [[i] for i in alone]
        lines = []
        for members in groups.values():
            task = task_config(configs[members[0]])
            device = resolve_device(task.device)
            each = member_bytes(task, task.data.vocab_size)
            free = int(self.memory_fraction * available_bytes(device)) // self.n_jobs  # n_jobs ensembles at once
            most = min(self.max_members or len(members), max(1, free // each), math.ceil(len(members) / self.n_jobs))
            chunks = split(members, most)
            units += chunks
            if len(chunks) > 1:
                lines.append(f"  {len(members)} jobs split into {len(chunks)} ensembles: about {each / 2**20:.0f} MiB "
                             f"per member, {free / 2**20:.0f} MiB to use on {device}"
                             f"{f', hydra.launcher.max_members={self.max_members}' if self.max_members else ''}")
        units.sort(key=lambda unit: unit[0])
        n_ensembles = sum(len(unit) > 1 for unit in units)
        at_once = f", {self.n_jobs} at a time in processes of their own" if self.n_jobs > 1 else ""
        log.info(f"Ensemble launcher: {len(configs)} jobs as {n_ensembles} batched ensemble(s) and "
                 f"{len(units) - n_ensembles} run(s) alone{at_once}")
        for unit in units:
            jobs = " | ".join(f"#{first + i} {' '.join(filter_overrides(job_overrides[i]))}" for i in unit)
            kind = f"ensemble of {len(unit)}" if len(unit) > 1 else \
                f"alone ({alone[unit[0]]})" if unit[0] in alone else "alone (no other job shares its architecture)"
            log.info(f"\t{kind}: {jobs}")
        for line in lines:
            log.info(line)
        del torch
        return units

    def _run(self, config: DictConfig, task_function) -> JobReturn:
        return run_job(hydra_context=self.hydra_context, task_function=task_function, config=config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def _register(self, configs: list[DictConfig]) -> tuple[list[JobReturn], list, str | None]:
        """Make each job's dir through Hydra's run_job (its .hydra/ files, callbacks) without training it:
        the JobReturns, the jobs as MemberJobs, and the name of the job's log file."""
        from minilm.train.ensemble import MemberJob

        members: list[MemberJob] = []

        def register(cfg: DictConfig) -> None:
            hydra_cfg = HydraConfig.get()
            members.append(MemberJob(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task),
                                     dict(hydra_cfg.runtime.choices)))

        returns = [self._run(config, register) for config in configs]
        for ret in returns:
            ret.return_value  # noqa: B018 - raises what registering the member raised
        file_handler = next((h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), None)
        return returns, members, Path(file_handler.baseFilename).name if file_handler else None

    def _launch_side_by_side(self, units: list[list[int]], configs: list[DictConfig], first: int) -> list[JobReturn]:
        """Every unit's job dirs made here, then the units trained n_jobs at a time in processes of their own.
        Ctrl-C reaches every process: each unit checkpoints and ends `interrupted`, as in one process."""
        registered = [self._register([configs[i] for i in unit]) for unit in units]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        threads = threads_per_job(self.n_jobs)
        runs: dict[int, JobReturn] = {}
        context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads or CUDA state
        previous = signal.signal(signal.SIGINT, lambda *_: None)  # the units stop themselves, then report
        try:
            with ProcessPoolExecutor(self.n_jobs, mp_context=context, initializer=_worker_setup,
                                     initargs=(threads,)) as pool:
                futures = [pool.submit(_train_unit, members, log_name, f"#{first + unit[0]} ")
                           for unit, (_, members, log_name) in zip(units, registered)]
                try:
                    for unit, (returns, _, _), future in zip(units, registered, futures):
                        with input_errors():
                            summaries = future.result()
                        for i, ret, summary in zip(unit, returns, summaries):
                            ret.return_value = job_result(summary)
                            runs[i] = ret
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # units not started stay for the next run to resume
                    raise
        finally:
            signal.signal(signal.SIGINT, previous)
        return [runs[i] for i in range(len(configs))]

    def _run_ensemble(self, configs: list[DictConfig], label: str) -> list[JobReturn]:
        """Make each member's job dir through Hydra's run_job (its .hydra/ files, callbacks), then train them
        as one ensemble; each JobReturn carries its member's result, as the job alone would."""
        from minilm.train.ensemble import train_ensemble
        from minilm.train.lifecycle import run_dirs_held

        returns, members, log_name = self._register(configs)
        # every member's train.log gets the ensemble's log (run_job left the last member's file handler)
        try:
            with input_errors(), run_dirs_held(members), _log_to(members[:-1], log_name):
                summaries = train_ensemble(members, label=f"{label} ")
        finally:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for ret, summary in zip(returns, summaries):
            ret.return_value = job_result(summary)
        return returns


def task_config(config: DictConfig) -> DictConfig:
    """A job's config as its task function sees it: without the hydra node."""
    return OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])


@contextmanager
def _log_to(members, log_name: str | None):
    """Inside, the root logger also writes to each member's log file (`log_name` in its run dir)."""
    handlers = []
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter), None)
    for member in members if log_name else []:
        handler = logging.FileHandler(member.run_dir / log_name)
        handler.setFormatter(formatter or logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        handlers.append(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def _worker_setup(threads: int) -> None:
    """A unit's process: its share of the cores, Ctrl-C as a run handles it, logs as Hydra writes them."""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def _train_unit(members: list, log_name: str | None, label: str) -> list[dict]:
    """Train one unit in a worker process: an ensemble, or a run alone as the basic launcher runs it.
    Returns the summaries in order."""
    from minilm.train.ensemble import train_ensemble
    from minilm.train.lifecycle import run_dirs_held
    from minilm.train.loop import train

    # held before the log file opens: nothing is written in a run dir that another run holds
    with run_dirs_held(members), _log_to(members, log_name):
        if len(members) == 1:
            job = members[0]
            return [train(job.cfg, job.run_dir, job.overrides, choices=job.choices)]
        return train_ensemble(members, label=label)
