"""Re-run a logged run with exactly its resolved config, and optionally check its first losses.

    minilm-reproduce SOURCE [key=value ...] [--verify N] [--force] [--out DIR] [--rtol R]

SOURCE is a run dir (outputs/... or one job of multirun/...), a local W&B run dir
(<run dir>/wandb/offline-run-*), or a W&B run path entity/project/run_id (the config is
fetched through the W&B API). key=value overrides apply on top of the logged config.

- The config: every logged key must be a key of this code's schema, and every schema key must
  be logged (a key added since the run is named with today's default, to pass as key=value).
- The code version: a warning if the git commit differs from the logged one.
- The data: the corpus fingerprint is computed before anything runs; if it differs from the
  logged one, reproduce refuses (exit 2) unless --force.
- Config revisions (a resumed run that accepted a config change, config_revisions.yaml) are
  replayed in order: the run trains with each config up to the step its successor took effect.
- The logged config must agree with the run's own checkpoint (checkpoints/last.pt holds the
  config it was trained with): a config.yaml edited after the run is refused, naming the keys.
- A fork (a run started with train.resume=<another run>: environment.json `resumed_from`) is
  replayed from the start: its parent's configs up to the step it was forked at, then its own.
  A parent that is not on this machine is refused, naming it.
- --verify N trains only the first N steps (the logged train.max_steps still sets the
  learning-rate schedule) and compares their losses with the logged ones: bitwise when the
  run is deterministic (deterministic=true: same machine, same software), otherwise within
  a relative tolerance (--rtol, default 1e-3; also for a member of a batched ensemble, whose norm
  gradients were reduced in another order). Ends with PASS (exit 0) or FAIL (exit 1).
  Without --verify the whole run is repeated.

The reproduction gets its own run dir (default outputs/reproductions/<time>_<source name>);
its W&B run, if the source logged to W&B, goes to the group "reproductions" so that reports
never pool it with the original's seeds. The token cache location (paths.*) is this
machine's, not the logged one.
"""

import argparse
import math
import re
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minilm import checkpoint
from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.analysis.runs import RunRecord, load_run
from minilm.config import resolve_device, validate
from minilm.data import corpus_fingerprint, load_corpus
from minilm.environment import environment_record, git_commit
from minilm.errors import CheckpointError, MinilmError, exit_on_input_error
from minilm.launch.cli import compose, one_line
from minilm.rundir import CHECKPOINTS_DIR, CONFIG_FILE, flatten, read_metrics
from minilm.train.lifecycle import RunDirLock, apply_revisions, math_changes
from minilm.train.loop import Alone, fit
from minilm.train.run import Run

EXIT_PASS, EXIT_FAIL = 0, 1
MACHINE_KEYS = ("paths.",)  # where this machine keeps things: never taken from the log


class Refused(MinilmError):
    """Reproduction cannot start; the message says why and what to do."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def reproduction_config(logged: dict, overrides: list[str]):
    """The logged config on this code's schema, with this machine's paths, plus the overrides."""
    defaults = compose([])
    today, then = flatten(OmegaConf.to_container(defaults, resolve=True)), flatten(logged)
    given = {o.partition("=")[0] for o in overrides}
    unknown = sorted(k for k in then.keys() - today.keys() if not k.startswith(MACHINE_KEYS))
    if unknown:
        raise Refused(f"the logged config has keys this code does not know: {', '.join(unknown[:8])}; reproduce it "
                      f"with the code version it logged")
    missing = sorted(k for k in today.keys() - then.keys() - given if not k.startswith(MACHINE_KEYS))
    if missing:  # a key's default keeps the behaviour from before it existed; --verify checks the result
        warn(f"the logged config lacks {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (added since "
             f"the run): using the schema's defaults, which keep the earlier behaviour")
    logged = {key: value for key, value in logged.items() if key != "paths"}
    try:
        cfg = OmegaConf.merge(defaults, logged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        reason = one_line(error, list(overrides))
        raise Refused(f"the logged config does not fit this code's schema: {reason}") from None
    cfg.train.resume = "auto"  # a reproduction starts in its own fresh dir
    validate(cfg)
    return cfg


def check_code_version(record: RunRecord) -> None:
    logged, now = record.environment.get("git") or {}, git_commit()
    if not logged.get("commit"):
        warn("the run did not log a git commit: cannot tell whether the code changed since")
    elif logged["commit"] != now["commit"]:
        warn(f"the code version differs: the run used commit {logged['commit'][:12]}, this checkout is "
             f"{(now['commit'] or 'not a git checkout')[:12]}; results may differ")
    if logged.get("dirty") or now.get("dirty"):
        warn(f"uncommitted changes ({'at run time' if logged.get('dirty') else 'now'}): the commit "
             f"alone does not pin the code")


def check_same_setup(record: RunRecord, device) -> None:
    """Bitwise equality also needs the same hardware, thread count (CPU reductions split by thread) and torch."""
    then, now = record.environment, environment_record(device)
    differs = [f"{key} {then[key]!r} then, {now[key]!r} now" for key in ("device_name", "torch_threads", "packages")
               if key in then and then[key] != now[key]]
    if differs:
        warn(f"bitwise equality is only expected on the same setup: {'; '.join(differs)}")


def check_data(cfg, record: RunRecord, force: bool) -> None:
    logged = record.environment.get("data_fingerprint")
    corpus = load_corpus(cfg.data, cfg.paths.cache_dir)
    fingerprint = corpus_fingerprint(corpus, cfg.data)  # what the token cache is keyed by
    if logged is None:
        warn("the run did not log a data fingerprint: cannot check that the data is the same")
    elif fingerprint != logged:
        message = (f"the data differs from the run's: fingerprint {fingerprint[:16]} here, {logged[:16]} logged "
                   f"(the corpus files, their order, data.vocab_size or data.val_fraction changed)")
        if not force:
            raise Refused(message + "; pass --force to run anyway")
        warn(message + "; running anyway (--force)")


def check_against_checkpoint(record: RunRecord) -> None:
    """Refuse a logged config that disagrees with the run's own latest checkpoint (config.yaml edited by hand):
    the checkpoint holds the config it was trained with, revisions included."""
    try:
        loaded = checkpoint.load_latest(Path(record.name), log=warn) if Path(record.name).is_dir() else None
    except CheckpointError as error:
        warn(f"cannot compare config.yaml with the run's checkpoint: {error}")
        return
    if loaded is None:
        return
    state, path = loaded
    # a revision at step s took effect after step s: a checkpoint of step s was written before it
    logged = apply_revisions(record.config, record.revisions, state["step"] - 1)
    changes = math_changes(state["config"], logged)
    if changes:
        shown = ", ".join(f"{key} ({a!r} in the checkpoint, {b!r} logged)" for key, (a, b) in list(changes.items())[:6])
        raise Refused(f"{record.name}: config.yaml disagrees with the run's checkpoint {path} (step {state['step']}) "
                      f"on {shown}{' and more' if len(changes) > 6 else ''}; restore the logged config, or pass the "
                      f"values you mean as key=value")


def lineage(record: RunRecord) -> list[tuple[RunRecord, int]]:
    """The runs `record` continues, oldest first, each with the step it started at: [(root, 0), ..., (record,
    the step it was forked at)]. A fork's parent is the run dir holding the checkpoint it resumed from."""
    fork = record.environment.get("resumed_from")
    if not fork:
        return [(record, 0)]
    source = Path(fork["checkpoint"])
    parent = source.parent.parent if source.parent.name == CHECKPOINTS_DIR else source.parent
    if not (parent / CONFIG_FILE).is_file():
        raise Refused(f"{record.name} was forked from {source} at step {fork['step']}, and its parent run dir "
                      f"{parent} is not here (no config.yaml): put the parent back at that path to replay it first, "
                      f"or reproduce the parent alone")
    return [*lineage(load_run(str(parent))), (record, fork["step"])]


def loss_series(runs: list[tuple[RunRecord, int]]) -> dict[int, float]:
    """The run's train/loss by step: each step from the run of its lineage that trained it."""
    series = {}
    for i, (record, start) in enumerate(runs):
        end = runs[i + 1][1] if i + 1 < len(runs) else math.inf
        if record.rows is None:
            raise Refused(f"{record.name} has no logged losses to verify against (a W&B run dir moved out of its "
                          f"run dir has none: verify against the run dir, or the W&B run path after `wandb sync`)")
        series.update({step: loss for step, loss in record.series("train/loss").items() if start < step <= end})
    return series


def logged_losses(series: dict[int, float], n: int, max_steps: int) -> list[float]:
    if n < 1:
        raise Refused(f"--verify {n}: verify at least one step")
    if n > max_steps:
        raise Refused(f"--verify {n} asks for more steps than the run trains (train.max_steps={max_steps})")
    missing = [step for step in range(1, n + 1) if step not in series]
    if missing:
        raise Refused(f"--verify {n}: the run logged no train/loss for step {missing[0]} "
                      f"(it logged {len(series)} steps)")
    return [series[step] for step in range(1, n + 1)]


def compare(logged: list[float], reproduced: list[float], bitwise: bool, rtol: float) -> int | None:
    """The first step (1-based) whose losses disagree, or None if all agree."""
    for step, (a, b) in enumerate(zip(logged, reproduced, strict=True), start=1):
        if math.isnan(a) and math.isnan(b):
            continue
        if (a != b) if bitwise else not abs(a - b) <= rtol * abs(a):
            return step
    return None


def default_out_dir(record: RunRecord) -> Path:
    name = re.sub(r"[^A-Za-z0-9._=,-]+", "_", Path(record.name).name)[:80]
    return Path("outputs") / "reproductions" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{name}"


def segments(runs: list[tuple[RunRecord, int]], overrides: list[str]) -> list[tuple[int, object]]:
    """[(first step, config)] of each stretch the run trained with one config: its lineage's runs in order (a
    fork's parent up to the step it was forked at), and each run's revisions in order."""
    plan = []
    for i, (record, start) in enumerate(runs):
        end = runs[i + 1][1] if i + 1 < len(runs) else math.inf
        starts = sorted({start} | {r["step"] for r in record.revisions if start < r["step"] < end})
        plan += [(step, reproduction_config(apply_revisions(record.config, record.revisions, step), overrides))
                 for step in starts]
    return plan


def train_segments(plan: list[tuple[int, object]], out: Path, until: int | None, label: str) -> tuple[dict, Run]:
    """Train each config up to the step the next took effect (or `until`); returns the last summary and
    run (still open: the caller closes it)."""
    if until is not None:  # --verify N: the stretches up to step N
        plan = [(start, cfg) for start, cfg in plan if start < until]
    for i, (_start, cfg) in enumerate(plan):
        if cfg.logger.backend == "wandb":
            cfg.logger.name, cfg.logger.group = f"reproduce {label}", "reproductions"
        cfg.train.allow_config_change = i > 0  # a revision: the next config continues the same run
        stop = plan[i + 1][0] if i + 1 < len(plan) else until
        run = Run(cfg, out, [f"reproduce={label}"])
        [summary] = fit(Alone(run), until_step=stop)
        if i + 1 < len(plan):
            run.save_checkpoint()
            run.close()
    return summary, run


def bitwise_expected(cfg, record: RunRecord) -> bool:
    """Deterministic runs reproduce bitwise, except a member of a batched ensemble (minilm/train/ensemble.py): its
    norm gradients were reduced in another order than a run alone reduces them, so --rtol applies."""
    members = (record.environment.get("ensemble") or {}).get("members", 1)
    if cfg.deterministic and members > 1:
        warn(f"the run trained in a batched ensemble of {members}: its losses are compared within --rtol, "
             f"not bitwise")
    return bool(cfg.deterministic) and members == 1


def verify(run: Run, out: Path, source: str, logged: list[float], bitwise: bool, rtol: float) -> int:
    series = {row["step"]: row["train/loss"] for row in read_metrics(out) if "train/loss" in row}
    reproduced = [float(series.get(step, math.nan)) for step in range(1, len(logged) + 1)]
    print(f"{'step':>5}  {'logged':>22}  {'reproduced':>22}  {'rel. diff':>9}")
    for step, (a, b) in enumerate(zip(logged, reproduced, strict=True), start=1):
        rel = abs(a - b) / abs(a) if a and math.isfinite(a - b) else float(a != b)
        print(f"{step:>5}  {a!r:>22}  {b!r:>22}  {rel:>9.2e}")
    bad = compare(logged, reproduced, bitwise, rtol)
    rule = "bitwise identical (deterministic=true)" if bitwise else f"equal within relative tolerance {rtol:g}"
    if bad is None:
        verdict, line = "PASS", f"PASS: the first {len(logged)} losses are {rule}"
    else:
        verdict = "FAIL"
        line = (f"FAIL: step {bad} differs: logged {logged[bad - 1]!r}, reproduced {reproduced[bad - 1]!r} "
                f"(required: {rule})")
    run.tracker.summary({"reproduce/source": source, "reproduce/verify": verdict, "reproduce/steps": len(logged)})
    print(line)
    return EXIT_PASS if bad is None else EXIT_FAIL


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run dir, local W&B run dir, or W&B run path entity/project/run_id")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the logged config")
    parser.add_argument("--verify", type=int, metavar="N", help="train N steps and compare their losses")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance when not deterministic")
    parser.add_argument("--force", action="store_true", help="run even if the data fingerprint differs")
    parser.add_argument("--out", type=Path, help="the reproduction's run dir")
    args = parser.parse_intermixed_args(argv)
    record = load_run(args.source)
    runs = lineage(record)
    for run_record, _start in runs:
        if run_record.config is None:
            raise Refused(f"{run_record.name} logged no config")
        check_against_checkpoint(run_record)
    plan = segments(runs, args.overrides)
    cfg = plan[-1][1]  # the run's own config (a fork's parent may have trained with another)
    device = resolve_device(cfg.device)
    check_code_version(record)
    if args.verify and cfg.deterministic:
        check_same_setup(record, device)
    logged = logged_losses(loss_series(runs), args.verify, cfg.train.max_steps) if args.verify is not None else None
    check_data(cfg, record, args.force)
    out = args.out or default_out_dir(record)
    if out.exists() and any(out.iterdir()):
        raise Refused(f"{out} is not empty; pass another --out")
    parents = "".join(f", after its parent {parent.name} up to step {runs[i + 1][1]}"
                      for i, (parent, _start) in enumerate(runs[:-1]))
    revisions = f" ({len(plan)} configs in turn)" if len(plan) > 1 else ""
    print(f"reproducing {record.name}{parents}{revisions} in {out}")
    label = Path(record.name).name
    with RunDirLock(out):
        summary, reproduction = train_segments(plan, out, args.verify, label)
        try:
            if logged is not None:
                bitwise = bitwise_expected(cfg, record)
                return verify(reproduction, out, record.name, logged, bitwise=bitwise, rtol=args.rtol)
            print(f"done: outcome {summary['outcome']}, val/loss {summary['val/loss']}")
            return EXIT_PASS
        finally:
            reproduction.close()


def main(argv: list[str] | None = None) -> int:
    """`minilm-reproduce` / scripts/reproduce.py."""
    cap_onednn_isa_if_amx_is_broken()  # before any bf16 matmul in this process
    return exit_on_input_error(run, argv)
