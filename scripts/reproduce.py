"""Re-run a logged run with exactly its resolved config, and optionally check its first losses.

    python scripts/reproduce.py SOURCE [key=value ...] [--verify N] [--force] [--out DIR] [--rtol R]

SOURCE is a run dir (outputs/... or one job of multirun/...), a local W&B run dir
(<run dir>/wandb/offline-run-*), or a W&B run path entity/project/run_id (the config is
fetched through the W&B API). key=value overrides apply on top of the logged config.

- The code version: a warning if the git commit differs from the logged one.
- The data: the corpus fingerprint is computed before anything runs; if it differs from the
  logged one, reproduce refuses (exit 2) unless --force.
- --verify N trains only the first N steps (the logged train.max_steps still sets the
  learning-rate schedule) and compares their losses with the logged ones: bitwise when the
  run is deterministic (deterministic=true: same machine, same software), otherwise within
  a relative tolerance (--rtol, default 1e-3). Ends with PASS (exit 0) or FAIL (exit 1).
  Without --verify the whole run is repeated.

The reproduction gets its own run dir (default outputs/reproductions/<time>_<source name>);
its W&B run, if the source logged to W&B, goes to the group "reproductions" so that reports
never pool it with the original's seeds. The token cache location (data.cache_dir) is this
machine's, not the logged one: it only says where the content-addressed cache lives.
"""

import argparse
import math
import re
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from minilm.cli import compose  # noqa: E402
from minilm.config import ConfigError, validate  # noqa: E402
from minilm.data import DataError, corpus_fingerprint, load_corpus  # noqa: E402
from minilm.repro import environment_record, git_commit  # noqa: E402
from minilm.runs import RunRecord, SourceError, flatten, load_run  # noqa: E402
from minilm.trainer import Trainer  # noqa: E402

EXIT_PASS, EXIT_FAIL, EXIT_REFUSED = 0, 1, 2


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Refused(Exception):
    """Reproduction cannot start; the message says why and what to do."""


def reproduction_config(record: RunRecord, overrides: list[str]):
    """The logged config, plus any key this code added since (current default), plus the overrides."""
    defaults = OmegaConf.to_container(compose([]), resolve=True)
    added = sorted(flatten(defaults).keys() - flatten(record.config).keys())
    if added:
        warn(f"the logged config lacks {', '.join(added)} (newer than the run): using today's defaults")
    try:
        cfg = OmegaConf.merge(defaults, record.config)
    except OmegaConfBaseException as err:
        raise Refused(f"the logged config does not fit this code's config layout: {' '.join(str(err).split())}")
    cfg.data.cache_dir = defaults["data"]["cache_dir"]
    OmegaConf.set_struct(cfg, True)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~")):
            raise Refused(f"override {override!r}: only key=value on existing keys applies to a logged config")
        current = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(current):
            raise Refused(f"{override!r} would swap a whole config group; set its keys instead (e.g. {key}.kind=...)")
        try:
            cfg.merge_with(OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as err:
            raise Refused(f"override {override!r}: {' '.join(str(err).split())}") from None
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
    fingerprint = corpus_fingerprint(load_corpus(cfg.data), cfg.data)  # what the token cache is keyed by
    if logged is None:
        warn("the run did not log a data fingerprint: cannot check that the data is the same")
    elif fingerprint != logged:
        message = (f"the data differs from the run's: fingerprint {fingerprint[:16]} here, {logged[:16]} logged "
                   f"(the corpus files, their order, data.vocab_size or data.val_fraction changed)")
        if not force:
            raise Refused(message + "; pass --force to run anyway")
        warn(message + "; running anyway (--force)")


def logged_losses(record: RunRecord, n: int, max_steps: int) -> list[float]:
    if record.rows is None:
        raise Refused(f"{record.name} has no logged losses to verify against (a W&B run dir moved out of its "
                      f"run dir has none: verify against the run dir, or the W&B run path after `wandb sync`)")
    series = record.series("train/loss")
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
    for step, (a, b) in enumerate(zip(logged, reproduced), start=1):
        if math.isnan(a) and math.isnan(b):
            continue
        if (a != b) if bitwise else not abs(a - b) <= rtol * abs(a):
            return step
    return None


def default_out_dir(record: RunRecord) -> Path:
    name = re.sub(r"[^A-Za-z0-9._=,-]+", "_", Path(record.name).name)[:80]
    return Path("outputs") / "reproductions" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{name}"


def verify(trainer: Trainer, source: str, logged: list[float], bitwise: bool, rtol: float) -> int:
    reproduced = []
    for _ in range(len(logged)):
        loss, _grad_norm = trainer.train_step()
        reproduced.append(loss.item())
        trainer.tracker.log({"train/loss": reproduced[-1]}, trainer.step)
    print(f"{'step':>5}  {'logged':>22}  {'reproduced':>22}  {'rel. diff':>9}")
    for step, (a, b) in enumerate(zip(logged, reproduced), start=1):
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
    trainer.tracker.summary({"reproduce/source": source, "reproduce/verify": verdict, "reproduce/steps": len(logged)})
    trainer.tracker.finish(exit_code=0 if bad is None else 1)
    print(line)
    return EXIT_PASS if bad is None else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run dir, local W&B run dir, or W&B run path entity/project/run_id")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the logged config")
    parser.add_argument("--verify", type=int, metavar="N", help="train N steps and compare their losses")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance when not deterministic")
    parser.add_argument("--force", action="store_true", help="run even if the data fingerprint differs")
    parser.add_argument("--out", type=Path, help="the reproduction's run dir")
    args = parser.parse_intermixed_args(argv)
    try:
        record = load_run(args.source)
        cfg = reproduction_config(record, args.overrides)
        device = validate(cfg)
        check_code_version(record)
        if args.verify and cfg.deterministic:
            check_same_setup(record, device)
        logged = logged_losses(record, args.verify, cfg.train.max_steps) if args.verify is not None else None
        check_data(cfg, record, args.force)
        out = args.out or default_out_dir(record)
        if out.exists() and any(out.iterdir()):
            raise Refused(f"{out} is not empty; pass another --out")
    except (Refused, SourceError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if cfg.logger.backend == "wandb":
        cfg.logger.name, cfg.logger.group = f"reproduce {Path(record.name).name}", "reproductions"
    print(f"reproducing {record.name} in {out}")
    trainer = Trainer(cfg, out, args.overrides)
    if logged is not None:
        return verify(trainer, record.name, logged, bitwise=cfg.deterministic, rtol=args.rtol)
    summary = trainer.fit()
    print(f"done: outcome {summary['outcome']}, val/loss {summary['val/loss']}")
    return EXIT_PASS


if __name__ == "__main__":
    sys.exit(main())
