"""The canned studies, the tiny size, the W&B sweep and the Slurm launcher: every job they describe is valid."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from minilm.analysis.studies import EXPECTATIONS
from minilm.config import FIGURES, validate
from minilm.launch.cli import CONFIG_DIR, compose, group_options, preflight
from tests.helpers import run_training

ROOT = CONFIG_DIR.parent
STUDIES = {"precision_matrix", "norm_placement", "lr_qknorm", "postnorm_warmup", "grad_norm_init", "zloss",
           "warmup_lr", "independent_wd", "adamw_eps", "attn_entropy", "deep_postnorm", "layernorm_eps", "fp8",
           "bf16_pure", "dyt", "curse_of_depth", "softcap", "skip_step", "reordered_norm",
           "muon_maxlogit", "mup_transfer", "attention_sink"}
# what each figure reads, as logged at step 1 (fp16_scale only by fp16 runs)
FIGURE_METRICS = {"loss_curves": "train/loss", "final_loss_vs_lr": "val/loss",
                  "grad_norm_by_layer": "diag/grad_rms/L0.mlp", "attn_logit_max": "diag/attn_logit_max/L0",
                  "attn_entropy": "diag/attn_entropy/L0",
                  "attn_sink": "diag/attn_sink/L0", "logz": "diag/logz_mean", "fp16_scale": "amp/skipped_steps",
                  "update_rms": "diag/update_rms/L0.mlp", "norm_error": "diag/norm_error/centred/1e-04",
                  "numerics": "numerics/act_in/underflow/L0.mlp.fc", "depth_profile": "diag/resid_var/L0"}


def sweep_params(name: str) -> dict[str, str]:
    return dict(OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params)


def test_every_canned_study_exists():
    assert set(group_options("experiment")) >= STUDIES


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_declares_its_report(name):
    cfg = compose([f"experiment={name}", *one_point(name)])
    validate(cfg)
    study = cfg.study
    assert study.name == name and study.expected and study.source and study.figures
    assert set(FIGURE_METRICS) == set(FIGURES)
    swept = set(sweep_params(name))
    assert study.panel is None or study.panel in swept or study.panel.split(".")[0] in swept  # a group sweep
    assert len(EXPECTATIONS[name]) >= 1  # its verdicts, computed from the runs (minilm/analysis/studies/)


def one_point(name: str) -> list[str]:
    """The first job of a study's grid (an fp16 one where the study plots the fp16 scaler)."""
    point = {key: str(values).split(",")[0] for key, values in sweep_params(name).items()}
    if "fp16_scale" in OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml").study.figures:
        point["precision"] = "fp16"
    return [f"{key}={value}" for key, value in point.items()]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_runs_one_step_and_logs_what_its_figures_read(name, tmp_path):
    rows = run_training([f"experiment={name}", *one_point(name), "train.max_steps=1"], tmp_path)
    logged = {key for row in rows if row["step"] == 1 for key in row}
    for figure in compose([f"experiment={name}"]).study.figures:
        assert FIGURE_METRICS[figure] in logged, figure
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_grid_is_valid_and_documents_its_expected_outcome(name):
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "expected:" in text and "source:" in text
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
    assert zloss.train.stop_on_divergence  # the divergence rule tells a spike from a divergence
    deep = compose(["experiment=deep_postnorm", "size=tiny", "model.n_layer=24", "model.placement=sandwich"])
    assert deep.model.n_layer == 24 and deep.model.d_model == 64


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


def test_qk_bound_sets_one_bound_per_option():
    from minilm.config import validate

    expected = {"none": (False, None), "qk_norm": (True, None), "qk_clip": (False, 4.0)}
    assert set(group_options("qk_bound")) == set(expected)
    for option, bound in expected.items():
        for optimizer in ("adamw", "muon"):
            cfg = compose(["experiment=muon_maxlogit", "size=tiny", f"optim={optimizer}", f"qk_bound={option}"])
            validate(cfg)
            assert (cfg.model.qk_norm, cfg.optim.qk_clip_tau, cfg.optim.name) == (*bound, optimizer)
    assert compose(["+qk_bound=qk_clip"]).optim.qk_clip_tau == 4.0  # outside the study it is added
