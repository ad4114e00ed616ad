"""train.compile_mode: torch.compile's mode, checked before work starts; a compiled ensemble steps as an
eager one (CPU: the aot_eager backend, the same graph without code generation)."""

import pytest

from minilm.launch.cli import compose, preflight
from minilm.rundir import read_metrics
from minilm.train.ensemble import MemberJob, train_ensemble
from tests.helpers import losses, with_tiny


@pytest.mark.parametrize("args,message", [
    (["train.compile_mode=reduce-overhead"], "train.compile_mode=reduce-overhead has no effect without "
                                             "train.compile=true"),
    (["train.compile=true", "train.compile_backend=aot_eager", "train.compile_mode=max-autotune"],
     "is a mode of the inductor backend"),
    (["train.compile=true", "train.compile_mode=reduce-overhead", "device=cpu"],
     "replays CUDA graphs, which need a CUDA device"),
    (["train.compile=true", "train.compile_mode=graphs"], "train.compile_mode=graphs is not valid; choose one of"),
])
def test_bad_compile_modes_are_refused_in_one_line(args, message):
    error = preflight(args)
    assert error is not None and message in error and "\n" not in error


def test_a_valid_compile_mode_passes():
    assert preflight(["train.compile=true", "train.compile_mode=max-autotune", "device=cpu"]) is None


@pytest.mark.slow
def test_a_compiled_ensemble_steps_as_an_eager_one(tmp_path):
    arms = [["seed=0"], ["seed=1", "optim.lr=1e-2"]]
    for tag, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_backend=aot_eager"])):
        base = with_tiny(["logger=none", "train.max_steps=3", "optim.warmup_steps=0", *extra])
        train_ensemble([MemberJob(compose([*base, *arm]), tmp_path / f"{tag}{i}", arm) for i, arm in enumerate(arms)])
    for i in range(len(arms)):
        eager, compiled = (losses(read_metrics(tmp_path / f"{tag}{i}")) for tag in ("eager", "compiled"))
        assert len(eager) == 3 and compiled == eager
