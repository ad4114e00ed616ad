"""Setup steps of the GPU check (scripts/gpu/gpu_check.sh): the carried wheels, the import check, the environment.

    python3 scripts/gpu/gpu_setup.py pins                  # NAME==VERSION of every carried package (--fetch)
    python3 scripts/gpu/gpu_setup.py verify .whl           # the wheel set is complete and fits the image
    python3 scripts/gpu/gpu_setup.py check-install --site SITE --require-cuda --environment OUT.json
                                                       # there, after pip install --target SITE: the
                                                       # import check, then date, device, driver, versions

The device image has torch, triton, tokenizers, pyarrow, pandas, huggingface_hub and the rest of
scripts/gpu/gpu_image_packages.txt, but no network: what the project needs beyond that travels as
wheels. W&B is not carried: every section runs logger=none (W&B could only run offline there),
its wheel set is ~25 MiB in ~20 packages, and its tests run on CPU in CI.
"""

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
# Carried packages, at the version installed on the machine that fetches them (CARRIED_PINS for those
# not installed there). fsspec: datasets pins fsspec<=its release's version, and the image's may be newer.
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "dill", "multiprocess", "fsspec",
           "liger-kernel", "torchao")
CARRIED_PINS = {"liger-kernel": "0.8.5"}  # the benchmark's comparison, not a project dependency
IMAGE_PACKAGES = ROOT / "scripts" / "gpu" / "gpu_image_packages.txt"
MAX_MIB = 50  # the whole working tree travels within 64 MiB
# The device's interpreter, for evaluating requirement markers away from it.
DEVICE_PYTHON = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
                     implementation_name="cpython", platform_python_implementation="CPython",
                     sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
FETCH_AGAIN = "run `bash scripts/gpu/gpu_check.sh --fetch` on a machine with the package registry and carry .whl"


def pins() -> list[str]:
    lines = []
    for name in CARRIED:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name not in CARRIED_PINS:
                sys.exit(f"{name} is not installed here and has no pin in CARRIED_PINS: pip install it first")
            lines.append(f"{name}=={CARRIED_PINS[name]}")
    return lines


def needs(requires: list[str] | None, environment: dict) -> list[Requirement]:
    """The requirements that apply without extras in `environment`."""
    out = []
    for line in requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(dict(environment, extra="")):
            out.append(req)
    return out


def wheel_requires(path: Path) -> list[str] | None:
    """The wheel's Requires-Dist lines; None when it is no readable wheel."""
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(metadata).decode()
    except (zipfile.BadZipFile, StopIteration, OSError):
        return None
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def fits_device(tags) -> bool:
    """A wheel the device's CPython 3.12 on x86-64 Linux can install."""
    return any(t.interpreter in ("py3", "py312", "cp312") and t.abi in ("none", "abi3", "cp312")
               and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
               for t in tags)


def verify(wheel_dir: Path) -> list[str]:
    """Problems with the wheel set: missing or extra packages, duplicates, wrong platform, unmet
    requirements (met = a carried wheel of a fitting version, or a package of the image), size."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        return [f"no wheels in {wheel_dir}/: {FETCH_AGAIN}"]
    image = {canonicalize_name(line.strip()) for line in IMAGE_PACKAGES.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    carried, problems = {}, []
    for path in wheels:
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except ValueError:
            problems.append(f"{path.name} is not named like a wheel: {FETCH_AGAIN}")
            continue
        if name in carried:
            problems.append(f"two versions of {name} in {wheel_dir}/ (pip would refuse): {FETCH_AGAIN}")
        if not fits_device(tags):
            problems.append(f"{path.name} is not for CPython 3.12 on x86-64 Linux: {FETCH_AGAIN}")
        carried[name] = (version, path)
    wanted = {canonicalize_name(n) for n in CARRIED}
    missing = sorted(wanted - carried.keys())
    if missing:  # the most likely problem first: it is the one line the check prints
        problems.insert(0, f"{wheel_dir}/ lacks {', '.join(missing)}: {FETCH_AGAIN}")
    problems += [f"{wheel_dir}/ holds {name}, which gpu_setup.py does not carry: {FETCH_AGAIN}"
                 for name in sorted(carried.keys() - wanted)]
    for name, (version, path) in sorted(carried.items()):
        requires = wheel_requires(path)
        if requires is None:
            problems.append(f"{path.name} is not a readable wheel: {FETCH_AGAIN}")
            continue
        for req in needs(requires, DEVICE_PYTHON):
            dep = canonicalize_name(req.name)
            if dep in carried:
                if not req.specifier.contains(carried[dep][0], prereleases=True):
                    problems.append(f"{name} {version} needs '{req}', but {dep} {carried[dep][0]} is carried")
            elif dep not in image:
                problems.append(f"{name} {version} needs '{req}', which neither the image nor {wheel_dir}/ has: "
                                f"add {req.name} to CARRIED in scripts/gpu/gpu_setup.py and fetch again")
    mib = sum(p.stat().st_size for p in wheels) / 2**20
    if mib > MAX_MIB:
        problems.append(f"the wheels take {mib:.1f} MiB, over {MAX_MIB} MiB: the working tree travels within 64 MiB")
    return problems


# What the sections run, each imported and used once: a failure here stops the part at once.
SMOKE = {
    "hydra + omegaconf + antlr4 (compose the small preset)":
        "from minilm.launch.cli import compose; compose(['model=small'])",
    "datasets + pyarrow + dill (a dataset mapped)":
        "import datasets; datasets.disable_progress_bars(); "
        "datasets.Dataset.from_dict({'text': ['a b']}).map(lambda row: {'n': len(row['text'])})",
    "tokenizers": "import tokenizers",
    "minilm (training loop, Triton ops)": "import minilm.train.loop, minilm.norms.triton_ops",
    "pytest, scipy, matplotlib (test collection)": "import pytest, scipy.stats, minilm.analysis.report",
    "torchao (the fp8 precision)": "import torchao.float8",
}
# A comparison, not a need: when it fails, the bandwidth section skips Liger's rows and says why.
OPTIONAL_SMOKE = {"liger-kernel": "import liger_kernel.ops.layer_norm, liger_kernel.ops.rms_norm, liger_kernel.ops.dyt"}


def check_install(site: Path | None, require_cuda: bool) -> int:
    """Carried requirements against the versions importable here (warnings), then SMOKE (fatal)."""
    environment = default_environment()
    for dist_info in sorted(site.glob("*.dist-info")) if site else []:
        dist = importlib.metadata.Distribution.at(dist_info)
        for req in needs(dist.requires, environment):
            try:
                found = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                print(f"setup FAILED: {dist.metadata['Name']} needs '{req}', which is not installed here: "
                      f"add {req.name} to CARRIED in scripts/gpu/gpu_setup.py and fetch again")
                return 1
            if not req.specifier.contains(found, prereleases=True):
                print(f"requirement warning: {dist.metadata['Name']} {dist.version} wants '{req}', found {found}; "
                      f"the import check decides")
    for what, code in {**SMOKE, **OPTIONAL_SMOKE}.items():
        try:
            exec(code, {})
        except Exception as error:  # noqa: BLE001 -- any failure of SMOKE stops the part
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if what in OPTIONAL_SMOKE:
                print(f"import warning: {what}: {reason} (its benchmark rows will say so)")
                continue
            print(f"setup FAILED: {what}: {reason} -- the carried wheels do not fit this image: fix CARRIED in "
                  f"scripts/gpu/gpu_setup.py, then {FETCH_AGAIN}")
            return 1
    import torch

    if require_cuda and not torch.cuda.is_available():
        print("setup FAILED: no CUDA GPU visible: parts 1 and 2 need one (on CPU run --dry-run)")
        return 1
    print(f"setup: {len(SMOKE)} import checks passed")
    return 0


def environment_record(path: Path) -> None:
    import torch
    import triton

    record = dict(date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  host=platform.node(), python=platform.python_version(), torch=torch.__version__,
                  cuda=torch.version.cuda, triton=triton.__version__)
    for name in ("liger-kernel", "datasets", "pyarrow", "fsspec", "hydra-core", "omegaconf", "tokenizers", "numpy"):
        try:
            record[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            record[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(dry_run=False, device=props.name, multiprocessors=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, check=False)
        fields = [f.strip() for f in query.stdout.strip().split(",")] if query.returncode == 0 else []
        record.update(zip(("driver", "max_sm_clock", "max_memory_clock", "power_limit"), fields))
    else:
        record.update(dry_run=True, device="cpu (dry run: no GPU figures)", driver=None)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    record["git_commit"] = git.stdout.strip() if git.returncode == 0 else None
    path.write_text(json.dumps(record, indent=1))
    print(f"environment: {record['device']}, driver {record['driver']}, torch {record['torch']}, "
          f"triton {record['triton']}, CUDA {record['cuda']}, liger-kernel {record['liger-kernel']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pins")
    commands.add_parser("verify").add_argument("wheel_dir", type=Path)
    check = commands.add_parser("check-install")
    check.add_argument("--site", type=Path, help="the --target folder of the carried wheels")
    check.add_argument("--require-cuda", action="store_true")
    check.add_argument("--environment", type=Path, help="then write the environment record here")
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(pins()))
    elif args.command == "verify":
        problems = verify(args.wheel_dir)
        if problems:
            print(f"wheels: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
            for problem in problems[1:]:
                print(f"  {problem}", file=sys.stderr)
            sys.exit(1)
        wheels = sorted(args.wheel_dir.glob("*.whl"))
        print(f"wheels: {len(wheels)} complete for the image, {sum(p.stat().st_size for p in wheels) / 2**20:.1f} MiB: "
              + ", ".join(p.name for p in wheels))
    else:
        code = check_install(args.site, args.require_cuda)
        if code == 0 and args.environment:
            environment_record(args.environment)
        sys.exit(code)


if __name__ == "__main__":
    main()
