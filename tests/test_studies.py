"""The canned studies, the tiny size, the W&B sweep and the Slurm launcher: every job they describe is valid."""

import pytest
import yaml
from omegaconf import OmegaConf

from minilm.cli import CONFIG_DIR, compose, group_options, preflight

ROOT = CONFIG_DIR.parent
STUDIES = {"precision_matrix", "norm_placement", "lr_qknorm", "postnorm_warmup", "grad_norm_init", "zloss", "fp8",
           "bf16_pure"}


def sweep_params(name: str) -> dict[str, str]:
    return dict(OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params)


def test_every_study_of_the_issue_exists():
    assert set(group_options("experiment")) >= STUDIES


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_grid_is_valid_and_documents_its_expected_outcome(name):
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Expected" in text
    params = sweep_params(name)
    assert params, "a study sweeps something"
    assert preflight(["-m", f"experiment={name}", "size=tiny"]) is None  # every job of the grid composes
    one_point = [f"{key}={str(values).split(',')[0]}" for key, values in params.items()]
    assert preflight([f"experiment={name}", *one_point]) is None  # one job, at the intended size


def test_size_tiny_shrinks_the_step_and_keeps_the_study():
    full = compose(["experiment=grad_norm_init"])
    tiny = compose(["experiment=grad_norm_init", "size=tiny"])
    assert full.model.d_model == 768 and tiny.model.d_model == 64 and tiny.train.batch_size < full.train.batch_size
    assert tiny.train.max_steps == full.train.max_steps == 1  # the study's own settings stay
    assert compose(["experiment=grad_norm_init", "size=tiny", "model.n_layer=24"]).model.n_layer == 24  # swept keys win
    zloss = compose(["experiment=zloss", "size=tiny"])
    assert zloss.optim.weight_decay == 0 and zloss.optim.lr == 1e-2 and zloss.model.qk_norm


def test_wandb_sweep_passes_its_parameters_as_hydra_overrides():
    sweep = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert sweep["command"][-1] == "${args_no_hyphens}" and (ROOT / sweep["program"]).exists()
    assert sweep["project"] == compose([]).logger.project
    grid = [f"{key}={','.join(map(str, spec['values']))}" for key, spec in sweep["parameters"].items() if key != "seed"]
    assert preflight(["-m", *grid]) is None


def test_slurm_launcher_config():
    launcher = OmegaConf.load(CONFIG_DIR / "hydra" / "launcher" / "slurm.yaml")
    assert list(launcher.defaults) == ["submitit_slurm"] and launcher.gpus_per_node == 1
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"


def test_long_override_lists_give_valid_job_dir_names():
    import minilm  # noqa: F401  (registers the resolver)

    node = OmegaConf.create({"dirname": "é" * 300, "clipped": "${minilm.clip:${dirname},200}"})
    assert len(node.clipped.encode()) <= 200 and node.clipped == "é" * 100
