"""A real 2x2 multirun on CPU, then report and reproduce over what it left behind."""

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import minilm.analysis.runs
from minilm.analysis import report
from minilm.launch import reproduce
from minilm.rundir import WANDB_CONFIG_FILE, read_metrics
from minilm.train.tracking import run_naming
from tests.helpers import with_tiny

pytestmark = pytest.mark.slow  # real runs in subprocesses: signals, torchrun, sweeps

ROOT = Path(__file__).resolve().parent.parent
GRID = ["model.placement=pre,post", "seed=0,1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, token_cache):
    """multirun dir of `train.py -m` over GRID: 4 jobs, each with a W&B offline run."""
    sweep_dir = tmp_path_factory.mktemp("multirun")
    overrides = with_tiny(["logger=wandb", "logger.mode=offline", "train.max_steps=4", "train.eval_interval=2",
                           "deterministic=true"])
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *overrides, *GRID,
                             f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.name[0].isdigit())


def wandb_run_dir(run_dir: Path) -> Path:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_one_run_dir_and_one_named_wandb_run_per_job(sweep):
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    seen, ids, groups = set(), set(), {}
    for job in jobs:
        assert len(job.name.encode()) <= 255  # the long command line was clipped to a valid dir name
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        placement, seed = (next(o.split("=")[1] for o in overrides if o.startswith(k)) for k in ("model.placement=",
                                                                                                  "seed="))
        seen.add((placement, seed))
        assert json.loads((job / "summary.json").read_text())["outcome"] == "completed"
        run_id = json.loads((job / "environment.json").read_text())["wandb_run_id"]
        wandb_dir = wandb_run_dir(job)
        assert run_id and wandb_dir.name.endswith(run_id)
        ids.add(run_id)
        name, group, _tags = run_naming(overrides)
        record = (wandb_dir / f"run-{run_id}.wandb").read_bytes()
        assert name.encode() in record and group.encode() in record  # named and grouped by its overrides
        assert "seed=" not in group
        groups.setdefault(group, set()).add(seed)
    assert seen == {("pre", "0"), ("pre", "1"), ("post", "0"), ("post", "1")}
    assert len(ids) == 4  # distinct W&B runs
    assert sorted(groups.values(), key=sorted) == [{"0", "1"}, {"0", "1"}]  # one group per arm, seeds pooled


def read_arms(out: Path) -> dict[str, dict]:
    with open(out / "arms.csv") as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def test_report_tables_the_arms_with_pooled_seeds_and_writes_plots(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    out = sweep / "report"
    arms = read_arms(out)
    assert set(arms) == {"model.placement=pre", "model.placement=post"}
    for placement, row in (("pre", arms["model.placement=pre"]), ("post", arms["model.placement=post"])):
        assert row["seeds"] == "2" and row["diverged"] == "0"
        finals = [json.loads((job / "summary.json").read_text())["val/loss"] for job in job_dirs(sweep)
                  if f"model.placement={placement}" in job.name]
        assert float(row["final_val_mean"]) == pytest.approx(statistics.fmean(finals))
        half = 12.706 * statistics.stdev(finals) / math.sqrt(2)  # Student t, 1 degree of freedom
        assert float(row["final_val_ci95"]) == pytest.approx(half)
        assert float(row["tokens_per_s"]) > 0
    for png in ("loss_curves.png", "grad_norm_by_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "| model.placement=post | 2 |" in text and "grad_norm_by_layer.png" in text
    assert "| model.placement=pre | 2 |" in capsys.readouterr().out


class FakeFile:
    def __init__(self, path: Path):
        self.path = path

    def download(self, root, replace=False):
        if not self.path.exists():
            raise ValueError(f"no file {self.path.name}")
        shutil.copy(self.path, Path(root) / self.path.name)


class FakeRun:
    """What the W&B API gives for one of the sweep's runs, served from its local copies."""

    def __init__(self, run_dir: Path):
        self.files = wandb_run_dir(run_dir) / "files"
        self.id = json.loads((run_dir / "environment.json").read_text())["wandb_run_id"]
        self.path = ["someone", "minilm", self.id]
        self.config = yaml.safe_load((run_dir / "config.yaml").read_text())
        self.summary = json.loads((run_dir / "summary.json").read_text())
        self.group = run_naming(yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()))[1]
        self.rows = read_metrics(run_dir)

    def file(self, name):
        return FakeFile(self.files / name)

    def scan_history(self):
        for row in self.rows:  # W&B gives every key in every row, None where not logged
            yield {"_step": row["step"], "_runtime": 1.0, "train/loss": None, **{k: v for k, v in row.items()
                                                                                if k != "step"}}


class FakeApi:
    def __init__(self, sweep_dir: Path):
        self.by_id = {run.id: run for run in map(FakeRun, job_dirs(sweep_dir))}
        self.calls = []

    def run(self, path):
        self.calls.append(path)
        return self.by_id[path.split("/")[-1]]

    def runs(self, path, filters):
        self.calls.append((path, filters))
        pattern = filters.get("group", {}).get("$regex", "")
        return [run for run in self.by_id.values() if pattern in run.group]


def test_report_from_wandb_matches_the_local_one(sweep, monkeypatch, tmp_path):
    api = FakeApi(sweep)
    monkeypatch.setattr(minilm.analysis.runs, "wandb_api", lambda: api)
    assert report.main(["someone/minilm", "--group", "model.placement", "--out", str(tmp_path / "wandb")]) == 0
    assert api.calls == [("someone/minilm", {"group": {"$regex": "model.placement"}})]
    assert report.main([str(sweep), "--out", str(tmp_path / "local")]) == 0
    assert read_arms(tmp_path / "wandb") == read_arms(tmp_path / "local")
    assert (tmp_path / "wandb" / "grad_norm_by_layer.png").exists()


def reproduce_main(argv, capsys) -> tuple[int, str, str]:
    code = reproduce.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reproduce_verify_passes_bitwise_on_an_untouched_run(sweep, tmp_path, capsys):
    source = job_dirs(sweep)[0]
    code, out, err = reproduce_main([str(source), "--verify", "3", "--out", str(tmp_path / "again"),
                                     "logger.backend=none"], capsys)
    assert code == 0, err
    assert out.strip().endswith("PASS: the first 3 losses are bitwise identical (deterministic=true)")
    assert "fingerprint" not in err
    rows = [r for r in read_metrics(tmp_path / "again") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # only the verified steps ran
    logged = {r["step"]: r["train/loss"] for r in read_metrics(source) if "train/loss" in r}
    assert [r["train/loss"] for r in rows] == [logged[1], logged[2], logged[3]]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["reproduce/verify"] == "PASS"


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    return dest


def test_reproduce_verify_fails_when_the_logged_config_was_tampered_with(sweep, tmp_path, capsys):
    source = copy_run(job_dirs(sweep)[0], tmp_path / "source")
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["optim"]["lr"] *= 2
    (source / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, _ = reproduce_main([str(source), "--verify", "3", "--out", str(tmp_path / "again"),
                                   "logger.backend=none"], capsys)
    assert code == 1
    assert "FAIL: step 2 differs" in out.splitlines()[-1]  # step 1's loss is the loss at init: lr-independent


def test_reproduce_refuses_when_the_data_differs_unless_forced(sweep, tmp_path, capsys):
    source = copy_run(job_dirs(sweep)[0], tmp_path / "source")
    env = json.loads((source / "environment.json").read_text())
    env["data_fingerprint"] = "0" * 64
    (source / "environment.json").write_text(json.dumps(env))
    code, out, err = reproduce_main([str(source), "--verify", "2", "--out", str(tmp_path / "refused"),
                                     "logger.backend=none"], capsys)
    assert code == 2 and "the data differs" in err and "--force" in err
    assert not (tmp_path / "refused").exists()  # refused before anything ran
    code, out, err = reproduce_main([str(source), "--verify", "2", "--out", str(tmp_path / "forced"), "--force",
                                     "logger.backend=none"], capsys)
    assert code == 0 and "running anyway" in err and "PASS" in out


def test_reproduce_from_a_local_wandb_run_dir(sweep, tmp_path, capsys):
    source = wandb_run_dir(job_dirs(sweep)[1])
    assert (source / "files" / WANDB_CONFIG_FILE).exists()
    code, out, err = reproduce_main([str(source), "--verify", "2", "--out", str(tmp_path / "again"),
                                     "logger.backend=none"], capsys)
    assert code == 0, err
    assert "PASS" in out


def test_reproduce_from_a_wandb_run_path_through_the_api(sweep, tmp_path, capsys, monkeypatch):
    api = FakeApi(sweep)
    monkeypatch.setattr(minilm.analysis.runs, "wandb_api", lambda: api)
    run_id = json.loads((job_dirs(sweep)[2] / "environment.json").read_text())["wandb_run_id"]
    code, out, err = reproduce_main([f"someone/minilm/{run_id}", "--verify", "3", "--out", str(tmp_path / "again"),
                                     "logger.backend=none"], capsys)
    assert code == 0, err
    assert api.calls == [f"someone/minilm/{run_id}"]
    assert "PASS: the first 3 losses are bitwise identical" in out
