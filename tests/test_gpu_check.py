"""scripts/gpu/gpu_check.sh: the dry run passes every section on CPU within its file limits (8 files,
2 folders per part), a real part refuses to start without a complete wheel set, and the wheel check
resolves what the carried wheels require."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import load_script

gpu_setup = load_script("gpu_setup", "gpu")

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_SECTIONS = ["setup", "correctness", "collect-only gpu-marked tests", "bandwidth", "precision", "setup",
                     "training: compile layernorm", "training: compile triton_layernorm", "training: eager layernorm",
                     "training: eager fp8", "setup", "sweep: lr_qknorm tiny",
                     "step: 7 runs alone, as an ensemble, folded", "training: tiny compiled",
                     "training: tiny CUDA graphs"]
MAX_FILES, MAX_FOLDERS = 8, 2  # what a part may write under $OUT


def gpu_check(args: list[str], out: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script decides
    environment.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "gpu_check.sh"), *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=1500)  # part 1 beside parts 2 + 3: 600 + 600 s


@pytest.mark.slow
def test_dry_run_passes_every_section_within_the_file_limits(tmp_path):
    out = tmp_path / "results"
    proc = gpu_check(["--dry-run"], out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    verdicts = [re.match(r"(PASS|FAIL|SKIP) (.+?) \(\d+ s\)", line) for line in lines]
    verdicts = [(m[1], m[2]) for m in verdicts if m]
    required = [(status, name) for status, name in verdicts if not name.endswith("(optional)")]
    assert required == [("PASS", name) for name in REQUIRED_SECTIONS]
    assert all(status in ("PASS", "SKIP") for status, name in verdicts if name.endswith("(optional)"))
    assert lines[-1] == "SUMMARY dry run: part 1 passed, part 2 passed, part 3 passed"

    for part in ("part1", "part2", "part3"):
        files = [p for p in (out / part).rglob("*") if p.is_file()]
        assert 0 < len(files) <= MAX_FILES, files
    for path in out.rglob("*"):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path
        if path.is_file():
            assert len(path.relative_to(out).parts) - 1 <= MAX_FOLDERS, path

    part1, part2 = out / "part1", out / "part2"
    correctness = json.loads((part1 / "correctness.json").read_text())
    assert correctness["complete"] and correctness["cases"] and all(c["ok"] for c in correctness["cases"])
    assert {(c["norm"], c["dtype"], c["path"]) for c in correctness["cases"]} == {
        (n, d, p) for n in ("layernorm", "rmsnorm") for d in ("float32", "float16", "bfloat16")
        for p in ("fused", "looped")}
    norms = json.loads((part1 / "bench_norms.json").read_text())
    ours = [r for r in norms["results"] if r["impl"] == "triton"]
    assert ours and all(r["us"] > 0 and "error" not in r for r in ours)
    assert all(r["us"] > 0 for r in norms["results"] if r["impl"] in ("eager", "compile"))
    precision = json.loads((part1 / "precision.json").read_text())["results"]
    assert set(precision) == {"fp16", "bf16"} and all(r["ok"] for r in precision.values())
    for name in ("compile_layernorm", "compile_triton_layernorm", "eager_layernorm", "eager_fp8"):
        training = json.loads((part2 / f"train_{name}.json").read_text())
        assert training["tokens_per_s"] > 0 and training["config"]["compile"] == name.startswith("compile")
        assert (training["compile"] is not None) == name.startswith("compile")
    assert "diagnostics_overhead" in json.loads((part2 / "train_compile_layernorm.json").read_text())
    part3 = out / "part3"
    for name in ("tiny", "small"):  # the small sweep is optional: it ran here, at toy size
        sweep = json.loads((part3 / f"sweep_{name}.json").read_text())
        assert sweep["launcher"] == "ensemble" and sweep["ratio"] > 0 and sweep["runs"] >= 2
    for name in ("tiny_compiled", "tiny_cuda_graphs"):
        assert json.loads((part3 / f"train_{name}.json").read_text())["config"]["compile"]
    step = json.loads((part3 / "step_tiny.json").read_text())
    assert step["members"] == 7 and all(ratio > 0 for ratio in step["ratios"].values())

    # The results page of a dry run says what it is and never lands under benchmarks/ by default.
    refused = subprocess.run([sys.executable, "scripts/gpu/gpu_results.py", str(out)], cwd=ROOT, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "dry-run" in refused.stderr
    page = tmp_path / "page"
    subprocess.run([sys.executable, "scripts/gpu/gpu_results.py", str(out), "--out", str(page)], cwd=ROOT, check=True)
    text = (page / "README.md").read_text()
    assert "**CPU dry run**" in text and "| met |" not in text and "MISSED" not in text
    assert (page / "part1" / "correctness.json").exists() and (page / "part2" / "check.log").exists()
    assert (page / "part3" / "sweep_tiny.json").exists() and "## Sweep throughput" in text
    assert "Step level (`scripts/bench/bench_ensemble.py`)" in text and (page / "part3" / "step_tiny.json").exists()


def test_a_real_part_without_wheels_stops_at_once_with_one_line(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    proc = gpu_check(["1"], tmp_path / "results", WHEEL_DIR=str(empty), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode != 0
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup FAILED: no wheels in")
    assert "gpu_check.sh --fetch" in lines[0]
    assert lines[0] in (tmp_path / "results" / "part1" / "check.log").read_text()  # it comes back from the device


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as archive:
        metadata = [f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]]
        archive.writestr(f"{dist}.dist-info/METADATA", "\n".join(metadata) + "\n")


def test_an_incomplete_wheel_set_stops_a_real_part_naming_what_is_missing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "omegaconf", "2.3.1", ["PyYAML>=5.1.0", "antlr4-python3-runtime==4.9.*"])
    proc = gpu_check(["2"], tmp_path / "results", WHEEL_DIR=str(wheels), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode != 0
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup FAILED: wheels:") and "lacks" in lines[0]
    assert "datasets" in lines[0] and "hydra-core" in lines[0] and "omegaconf" not in lines[0].split("lacks")[1]


def complete_set(folder: Path, datasets_requires: list[str]) -> None:
    folder.mkdir()
    for name in gpu_setup.CARRIED:
        fake_wheel(folder, name, "9.9", datasets_requires if name == "datasets" else [])


def test_verify_accepts_requirements_met_by_the_image_or_the_carried_wheels(tmp_path):
    complete_set(tmp_path / "wheels", ["pyarrow>=24.0.0", "dill<10", 'importlib-resources; python_version < "3.9"'])
    assert gpu_setup.verify(tmp_path / "wheels") == []


@pytest.mark.parametrize("requirement,problem", [
    ("not-on-the-image", "which neither the image nor"),
    ("dill<1.0", "but dill 9.9 is carried"),
])
def test_verify_names_an_unmet_requirement(tmp_path, requirement, problem):
    complete_set(tmp_path / "wheels", [requirement])
    problems = gpu_setup.verify(tmp_path / "wheels")
    assert len(problems) == 1 and problem in problems[0] and requirement.split("<")[0] in problems[0]


def test_results_page_judges_each_goal_from_the_json(tmp_path):
    """Synthetic GPU results (made-up inputs, not measurements): each goal is met or missed by its figure."""
    bench_norms, gpu_results = load_script("bench_norms", "bench"), load_script("gpu_results", "gpu")

    part1, part2 = tmp_path / "part1", tmp_path / "part2"
    part1.mkdir()
    part2.mkdir()
    env = dict(date_utc="2030-01-01T00:00:00+00:00", dry_run=False, device="GPU", driver="1", torch="t", triton="t")
    (part1 / "environment.json").write_text(json.dumps(env))
    (part1 / "check.log").write_text("PASS bandwidth (1 s): x\nSUMMARY part 1: 1 passed\n")
    copy = 1000.0
    rows = [dict(norm="rmsnorm", impl=impl, dtype="bfloat16", rows=8, cols=cols, mode=mode, us=us, gbps=gbps)
            for impl, cols, mode, us, gbps in [
                ("triton", 1024, "fwd", 10, 900), ("triton", 1024, "fwd+bwd", 20, 600),
                ("compile", 1024, "fwd", 9, 1000), ("compile", 1024, "fwd+bwd", 30, 400)]]
    norms = dict(results=rows, copy_gbps=copy, impls=["triton", "compile"], timer="t", quick=False,
                 goals=bench_norms.judge_goals(rows, copy))
    (part1 / "bench_norms.json").write_text(json.dumps(norms))
    training = dict(config=dict(compile=True, norm="layernorm"), mfu=0.40, framework_overhead_without_diagnostics=0.02,
                    diagnostics_overhead=0.05, tokens_per_s=1.0)
    (part2 / "train_compile_layernorm.json").write_text(json.dumps(training))
    (part2 / "check.log").write_text("PASS training: compile layernorm (1 s): x\n")

    part3 = tmp_path / "part3"
    part3.mkdir()
    sweep = dict(overrides=["experiment=lr_qknorm", "size=tiny"], launcher="ensemble", runs=14, steps=30, ratio=12.0,
                 median_seconds={"sequential": 120.0, "ensemble": 10.0},
                 runs_per_hour={"sequential": 420.0, "ensemble": 5040.0})
    (part3 / "sweep_tiny.json").write_text(json.dumps(sweep))
    (part3 / "sweep_small.json").write_text(json.dumps({**sweep, "ratio": 2.0}))
    for name, tokens in (("tiny_compiled", 100.0), ("tiny_cuda_graphs", 150.0)):
        (part3 / f"train_{name}.json").write_text(json.dumps(dict(config=dict(compile=True, norm="layernorm"),
                                                                  tokens_per_s=tokens)))

    text, _ = gpu_results.page(tmp_path)
    verdicts = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit(" | ", 1)[1]
                for line in text.splitlines() if line.startswith(("| sweep:", "| training: model=tiny"))}
    assert verdicts["sweep: lr_qknorm, size=tiny, batched ensembles vs in turn, runs per hour"] == "met"  # 12x
    assert verdicts["sweep: 3 runs of lr_qknorm, model=small, batched ensemble vs in turn, runs per hour"] == "MISSED"
    assert verdicts["training: model=tiny compiled, CUDA graphs (reduce-overhead) vs inductor's default mode, "
                    "tokens/s"] == "pays"  # 1.5x
    goals = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit(" | ", 1)[1]
             for line in text.splitlines() if line.startswith("| norms:") or line.startswith("| training:")}
    assert goals["norms: bf16, N >= 1024: forward >= 85% of copy bandwidth"] == "met"  # 900 of 1000 GB/s
    assert goals["norms: bf16, N >= 1024: forward+backward >= 70% of copy bandwidth"] == "MISSED"  # 600
    assert goals["norms: never slower than torch.compile or Liger (every shape, dtype and mode)"] == "MISSED"
    assert goals["norms: bf16, N = 128..512: >= 2x torch eager (every mode)"] == "not measured"
    assert goals["training: MFU, small preset, bf16, torch.compile, torch LayerNorm"] == "MISSED"
    assert goals["training: framework overhead over a bare loop (same config, diagnostics off)"] == "met"
    assert goals["training: diagnostics at their default interval (on vs off)"] == "MISSED"
    assert "| 40.0% |" in text and "0.90x best of compile / liger" in text
