"""Every bad input is refused before work starts: a non-zero exit, one `error:` line naming the key or
path and the fix, and no traceback. The commands run in this process, as a user types them."""

import errno
import json
import logging
import os
import pickle
import shutil
import sys

import pytest
import torch
import yaml

from minilm import checkpoint
from minilm.analysis import report as report_cli
from minilm.errors import EXIT_INPUT_ERROR
from minilm.launch import cli, reproduce
from minilm.launch.replay import main as replay_main
from minilm.rundir import read_metrics
from tests.helpers import fit_alone, with_tiny

PLAIN = ["logger=none", "train.max_steps=1"]

# (command-line overrides, fragments the one error line must contain)
BAD_CONFIG = [
    (["model.qk_norm=maybe"], ["model.qk_norm=maybe", "boolean"]),
    (["model.qk_norm=2"], ["model.qk_norm=2", "boolean"]),
    (["train.compile=maybe"], ["train.compile=maybe", "boolean"]),
    (["model.bias=maybe"], ["model.bias=maybe", "boolean"]),
    (["model.tie_embeddings=2"], ["model.tie_embeddings=2", "boolean"]),
    (["deterministic=maybe"], ["deterministic=maybe", "boolean"]),
    (["deterministic=0"], ["deterministic=0", "boolean"]),
    (["train.max_steps=2.5"], ["train.max_steps=2.5", "integer"]),
    (["model.n_layer=2.5"], ["model.n_layer=2.5", "integer"]),
    (["seed=abc"], ["seed=abc", "integer"]),
    (["seed=1.5"], ["seed=1.5", "integer"]),
    (["seed=-1"], ["seed=-1", ">= 0"]),
    (["train.batch_size=8.5"], ["train.batch_size=8.5", "integer"]),
    (["model.dropout=abc"], ["model.dropout=abc", "number"]),
    (["model.dropout=1.0"], ["model.dropout=1.0", "[0, 1)"]),
    (["data.val_fraction=abc"], ["data.val_fraction=abc", "number"]),
    (["data.val_fraction=1.0"], ["data.val_fraction=1.0", "(0, 1)"]),
    (["optim.beta1=1.5"], ["optim.beta1=1.5", "[0, 1)"]),
    (["optim.beta2=1"], ["optim.beta2=1", "[0, 1)"]),
    (["optim.eps=-1"], ["optim.eps=-1", "> 0"]),
    (["train.compile=true", "train.compile_backend=nosuch"], ["train.compile_backend='nosuch'", "inductor"]),
    (["train.divergence_margin=-100"], ["train.divergence_margin=-100", ">= 0"]),
    (["train.divergence_window=0"], ["train.divergence_window=0", ">= 1"]),
    (["data.max_files=-3"], ["data.max_files=-3", ">= 1"]),
    (["norm=foo"], ["norm=foo", "layernorm", "rmsnorm"]),
    (["precision=fp7"], ["precision=fp7", "bf16"]),
    (["model=huge"], ["model=huge", "small", "tiny"]),
    (["experiment=nosuch"], ["experiment=nosuch", "lr_qknorm"]),
    (["size=huge"], ["size=huge", "tiny"]),
    (["logger=nonexistent"], ["logger=nonexistent", "wandb"]),
    (["model.d_model=100", "model.n_head=3"], ["model.d_model=100", "n_head=3"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    (["optim.lr=0"], ["optim.lr=0", "> 0"]),
    (["optim.lr=inf"], ["optim.lr=inf", "finite"]),
    (["optim.min_lr_ratio=2"], ["optim.min_lr_ratio=2", "[0, 1]"]),
    (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1", ">= 0"]),
    (["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"]),
    (["optim.z_loss=-1"], ["optim.z_loss=-1", ">= 0"]),
    (["optim.independent_weight_decay=true", "optim.weight_decay=1"], ["optim.weight_decay=1", "< 1", "1e-4"]),
    (["study.figures=[loss_curves,spaghetti]"], ["study.figures=", "'spaghetti'", "loss_curves", "norm_error"]),
    (["study.panel=optim.lrr"], ["study.panel='optim.lrr'", "config key"]),
    (["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
    (["train.grad_accum=0"], ["train.grad_accum=0", ">= 1"]),
    (["train.grad_clip=-1"], ["train.grad_clip=-1", ">= 0"]),
    (["train.eval_batches=0"], ["train.eval_batches=0", ">= 1"]),
    (["train.log_interval=0"], ["train.log_interval=0", ">= 1"]),
    (["train.ckpt_interval=-5"], ["train.ckpt_interval=-5", ">= 0"]),
    (["train.sample_tokens=-1"], ["train.sample_tokens=-1", ">= 0"]),
    (["train.foo=1"], ["train.foo", "batch_size"]),
    (["+train.foo=1"], ["train.foo", "batch_size"]),
    (["foo=1"], ["foo", "model", "seed"]),
    (["model.placement=middle"], ["model.placement=middle", "pre", "post", "sandwich"]),
    (["model.init=kaiming"], ["model.init=kaiming", "gpt2", "xavier"]),
    (["model.n_head=0"], ["model.n_head=0", ">= 1"]),
    (["model.block_size=0"], ["model.block_size=0", ">= 1"]),
    (["model.mlp_ratio=0"], ["model.mlp_ratio=0", ">= 1"]),
    (["model.position=alibi"], ["model.position=alibi", "learned", "rope", "none"]),
    (["model.mlp=geglu"], ["model.mlp=geglu", "relu2", "swiglu"]),
    (["model.n_kv_head=3"], ["model.n_kv_head=3", "model.n_head=4", "divisor"]),
    (["model.n_kv_head=0"], ["model.n_kv_head=0", ">= 1"]),
    (["model.logit_softcap=0"], ["model.logit_softcap=0", "> 0"]),
    (["model.attn_softcap=-50"], ["model.attn_softcap=-50", "> 0"]),
    (["model.rope_theta=500"], ["model.rope_theta=500", "model.position=rope"]),
    (["model.position=rope", "model.n_head=8", "model.d_model=40"], ["model.position=rope", "odd"]),
    (["model.backout=true", "model.n_layer=1"], ["model.backout=true", "model.n_layer=1"]),
    (["norm.depth_scaling=true", "model.placement=post"], ["norm.depth_scaling=true", "model.placement=post"]),
    (["norm.depth_scaling=true", "model.placement=reordered"], ["norm.depth_scaling", "placement=reordered"]),
    (["precision=fp8", "model.n_head=16", "model.n_kv_head=1"], ["model.n_kv_head", "8 key/value features", "16"]),
    (["norm.eps=0"], ["norm.eps=0", "> 0"]),
    (["norm.eps=-1e-5"], ["norm.eps=-1e-05", "> 0"]),
    (["norm.affine=perhaps"], ["norm.affine=perhaps", "boolean"]),
    (["norm=dyt", "norm.dyt_alpha=0"], ["norm.dyt_alpha=0", "finite number > 0"]),
    (["norm.dyt_alpha=-0.5"], ["norm.dyt_alpha=-0.5", "finite number > 0"]),
    (["norm=triton_dyt", "norm.dyt_alpha=inf"], ["norm.dyt_alpha=inf", "finite number > 0"]),
    (["norm=dyt", "norm.dyt_alpha=nan"], ["norm.dyt_alpha=nan", "finite number > 0"]),
    (["precision.init_scale=0"], ["precision.init_scale=0", "> 0"]),
    (["precision.growth_interval=0"], ["precision.growth_interval=0", ">= 1"]),
    (["data.vocab_size=100"], ["data.vocab_size=100", ">= 257"]),
    (["data.num_proc=0"], ["data.num_proc=0", ">= 1"]),
    (["data.errors=ignore"], ["data.errors=ignore", "replace", "strict"]),
    (["data=text"], ["data.files"]),
    (["data=text", "data.files=notes.txt"], ["data.files=notes.txt", "list"]),
    (["data=hf", "data.name=null"], ["data.name"]),
    (["logger.mode=sometimes"], ["logger.mode=sometimes", "offline", "disabled"]),
    (["diagnostics.interval=-1"], ["diagnostics.interval=-1", ">= 0"]),
    (["diagnostics.spike_window=0"], ["diagnostics.spike_window=0", ">= 1"]),
    (["diagnostics.spike_sigma=0"], ["diagnostics.spike_sigma=0", "> 0"]),
    (["device=tpu"], ["device='tpu'", "cpu"]),
    (["-m", "norm=layernorm,bogus"], ["norm=bogus", "rmsnorm"]),
    (["-m", "optim.lr=1e-3,-1"], ["optim.lr=-1"]),
    (["-m", "model.qk_norm=false,2"], ["model.qk_norm=2", "boolean"]),
    (["-m", "seed=range(0,3)", "train.batch_size=0"], ["train.batch_size=0"]),
    (["experiment=lr_qknorm"], ["experiment=lr_qknorm", "-m", "optim.lr", "model.qk_norm"]),
    (["precision=bf16", "precision.rounding=kahan"], ["precision.rounding", "bf16_pure only"]),
    (["precision=bf16_pure", "precision.rounding=null"], ["precision=bf16_pure needs precision.rounding"]),
    (["precision=bf16_pure", "precision.rounding=up"], ["precision.rounding=up", "stochastic", "kahan"]),
    (["precision=fp8", "precision.fp8_recipe=blockwise"], ["precision.fp8_recipe=blockwise", "rowwise"]),
    (["precision=fp8", "model.d_model=72"], ["precision=fp8", "model.d_model=72", "multiple of 16"]),
    (["precision=fp8", "train.batch_size=3", "model.block_size=25"], ["75 tokens", "multiple of 16"]),
    (["hydra/launcher=ensemble", "hydra.launcher.n_jobs=0"], ["hydra.launcher.n_jobs=0", "integer >= 1"]),
    (["hydra/launcher=ensemble", "hydra.launcher.n_jobs=two"], ["hydra.launcher.n_jobs='two'", "integer >= 1"]),
    (["hydra/launcher=ensemble", "hydra.launcher.max_members=0"], ["hydra.launcher.max_members=0", "or null"]),
    (["hydra/launcher=ensemble", "hydra.launcher.memory_fraction=1.5"],
     ["hydra.launcher.memory_fraction=1.5", "(0, 1]"]),
]
if not torch.cuda.is_available():
    BAD_CONFIG.append((["device=cuda"], ["device='cuda'", "no CUDA GPU"]))


@pytest.fixture(autouse=True)
def restore_logging():
    """Hydra points the root logger at the streams of the test that ran it: restore it after each test."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


def run_cli(argv: list[str], capsys, command=None) -> tuple[int, str, str]:
    """A command as the user types it, in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    if command is None:
        saved, sys.argv = sys.argv, ["train.py", *argv]
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            sys.argv = saved
    else:
        code = command(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, fragments):
    assert code == EXIT_INPUT_ERROR, (code, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.slow
@pytest.mark.parametrize("argv, fragments", BAD_CONFIG, ids=lambda v: " ".join(v) if isinstance(v[0], str) else "")
def test_bad_config_value_is_one_line_before_any_work(argv, fragments, capsys, tmp_path):
    guard = ["train.max_steps=1", "logger=none"]  # were it accepted, it would train one step, not 600
    code, out, err = run_cli([*guard, *argv, f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, out, err, fragments)
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run dir


@pytest.mark.parametrize("override, fragments", [
    ("data.text_column=ü", ["'ü' (U+00FC)", "quote the value", """'data.text_column="ü"'"""]),
    ("train.max_steps=5,", ["trailing comma", "quote the value"]),
    ("train.max_steps=５", ["'５' (U+FF15)", "quote the value", "ASCII digits"]),
    ("model.n_layer=2]", ["extraneous input ']'", "quote the value"]),
])
def test_an_override_hydra_cannot_parse_is_one_line_naming_it(override, fragments, capsys, tmp_path):
    code, out, err = run_cli(["train.max_steps=1", override, f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, out, err, [f"error: {override} is not valid override syntax", *fragments])
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_yaml_booleans_parse_as_booleans_by_design():
    assert cli.preflight(["model.qk_norm=no"]) is None
    assert cli.compose(["model.qk_norm=no"]).model.qk_norm is False
    assert cli.compose(["model.qk_norm=yes"]).model.qk_norm is True
    assert cli.compose(["model.qk_norm=off", "train.compile=on"]).train.compile is True


def test_every_schema_default_is_a_valid_config():
    from minilm.config import validate

    validate(cli.compose([]))


# ---------------------------------------------------------------- data


def text_run(tmp_path, files, *extra):
    return with_tiny([*PLAIN, "data=text", f"data.files=[{','.join(str(f) for f in files)}]", *extra,
                      f"hydra.run.dir={tmp_path / 'run'}"])


def documents(folder, n=12, text="the quick brown fox jumps over the lazy dog. "):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"doc{i}.txt"
        path.write_text(f"document {i}: " + text * 40)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_missing_data_file(tmp_path, capsys):
    assert_one_line_error(*run_cli(text_run(tmp_path, [tmp_path / "missing.txt"]), capsys),
                          ["missing.txt", "matches no file"])


@pytest.mark.slow
def test_one_pattern_of_several_matching_nothing(tmp_path, capsys):
    docs = documents(tmp_path / "docs")
    assert_one_line_error(*run_cli(text_run(tmp_path, [docs[0], tmp_path / "typo*.md"]), capsys),
                          ["typo*.md", "matches no file"])


@pytest.mark.slow
def test_empty_data_files(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(*run_cli(text_run(tmp_path, [tmp_path / "empty.txt"]), capsys), ["empty", "empty.txt"])


@pytest.mark.slow
def test_one_document_corpus(tmp_path, capsys):
    doc = documents(tmp_path / "docs", n=1)[0]
    assert_one_line_error(*run_cli(text_run(tmp_path, [doc]), capsys), ["1 documents", "data.val_fraction"])


@pytest.mark.slow
def test_non_utf8_text_is_refused_under_strict(tmp_path, capsys):
    docs = documents(tmp_path / "docs")
    docs[3].write_bytes(b"caf\xe9 au lait " * 50)
    code, out, err = run_cli(text_run(tmp_path, docs, "data.errors=strict"), capsys)
    assert_one_line_error(code, out, err, ["doc3.txt", "not UTF-8", "0xe9", "data.errors=replace"])


def test_non_utf8_text_is_replaced_with_one_warning_by_default(tmp_path, caplog):
    from omegaconf import OmegaConf

    from minilm.config import DataConfig
    from minilm.data import load_corpus

    docs = documents(tmp_path / "docs")
    docs[3].write_bytes(b"caf\xe9 au lait " * 50)
    docs[4].write_bytes(b"\xff\xfe ok")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"source": "text", "files": [str(p) for p in docs]})
    corpus = load_corpus(cfg, str(tmp_path / "cache"))
    warnings = [r.message for r in caplog.records if "not UTF-8" in r.message]
    assert warnings == ["52 byte(s) in 2 file(s) were not UTF-8 and were replaced by U+FFFD; set data.errors=strict "
                        "to refuse such files instead"]
    assert corpus["text"][corpus["key"].index(docs[3].name)].startswith("caf\ufffd au lait")


@pytest.mark.slow
def test_unreadable_data_file(tmp_path, capsys, monkeypatch):
    docs = documents(tmp_path / "docs")
    real = type(docs[0]).read_bytes

    def read_bytes(path):
        if path.name == "doc5.txt":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(type(docs[0]), "read_bytes", read_bytes)
    assert_one_line_error(*run_cli(text_run(tmp_path, docs), capsys), ["doc5.txt", "Permission denied"])


def test_broken_local_hf_dataset(tmp_path, capsys):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": f"story {i} " * 30} for i in range(20)]).save_to_disk(str(saved))
    for arrow in saved.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    code, out, err = run_cli(with_tiny([*PLAIN, "data=hf", f"data.name={saved}", f"hydra.run.dir={tmp_path / 'r'}"]),
                             capsys)
    assert_one_line_error(code, out, err, [str(saved), "cannot be loaded"])


def test_local_hf_dataset_without_data(tmp_path, capsys):
    (tmp_path / "nodata").mkdir()
    code, out, err = run_cli(with_tiny([*PLAIN, "data=hf", f"data.name={tmp_path / 'nodata'}",
                                        f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, ["nodata", "could not load dataset"])


@pytest.mark.slow
def test_token_cache_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = run_cli(with_tiny([*PLAIN, f"paths.cache_dir={blocker / 'cache'}",
                                        f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, ["token cache dir", "MINILM_CACHE"])


@pytest.mark.slow
def test_too_little_disk_for_the_token_cache(tmp_path, capsys, monkeypatch):
    from minilm import data

    monkeypatch.setattr(data, "free_bytes", lambda _path: 1000)
    code, out, err = run_cli(with_tiny([*PLAIN, f"paths.cache_dir={tmp_path / 'cache'}",
                                        f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, ["bytes", str(tmp_path / "cache"), "1000 are free"])


# ---------------------------------------------------------------- run dir and disk


def test_run_dir_is_an_existing_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    code, out, err = run_cli(with_tiny([*PLAIN, f"hydra.run.dir={tmp_path / 'taken'}"]), capsys)
    assert_one_line_error(code, out, err, [str(tmp_path / "taken"), "existing file"])


def test_run_dir_under_proc(capsys):
    code, out, err = run_cli(with_tiny([*PLAIN, "hydra.run.dir=/proc/minilm-run"]), capsys)
    assert_one_line_error(code, out, err, ["hydra.run.dir=/proc/minilm-run", "cannot be created"])


@pytest.mark.slow
def test_run_file_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "r" / "metrics.jsonl").mkdir(parents=True)
    code, out, err = run_cli(with_tiny([*PLAIN, f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, [str(tmp_path / "r" / "metrics.jsonl"), "is a folder", "move it away"])
    assert not (tmp_path / "r" / "config.yaml").exists()  # refused before anything was written


@pytest.mark.slow
def test_run_dir_too_small_for_checkpoints(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda _path: 1000)
    code, out, err = run_cli(with_tiny([*PLAIN, f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, [str(tmp_path / "r"), "1000 bytes free", "hydra.run.dir"])


@pytest.mark.slow
def test_disk_full_while_checkpointing_leaves_a_summary(tmp_path, capsys, monkeypatch):
    def full(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    code, out, err = run_cli(with_tiny([*PLAIN, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, ["could not write", "last.pt", "free"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["outcome"] == "failed" and "could not write" in summary["error"]


class FullDisk:
    """A file on a disk that fills up after `room` bytes: its writes then raise ENOSPC, as the OS does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["too little space, seen before writing", "the disk fills while torch writes"])
def test_disk_full_at_a_later_checkpoint_is_one_line_keeps_the_last_and_resumes_bitwise(how, tmp_path, capsys,
                                                                                       monkeypatch):
    run = ["deterministic=true", "optim.warmup_steps=0", "train.max_steps=12", "train.ckpt_interval=4",
           "logger=none"]
    assert run_cli(with_tiny([*run, f"hydra.run.dir={tmp_path / 'full'}"]), capsys)[0] == 0
    last = tmp_path / "r" / "checkpoints" / checkpoint.LAST
    if how.startswith("too little"):
        free = checkpoint.free_bytes
        monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000 if last.exists() else free(path))
    else:
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda state, f: save(state, FullDisk(f, 1000) if last.exists() else f))
    code, out, err = run_cli(with_tiny([*run, f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, [str(last), "free", "run the same command again"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["step"] == 8 and str(last) in summary["error"]
    assert checkpoint.load(last)["step"] == 4 and sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    monkeypatch.undo()  # space freed: the same command resumes
    assert run_cli(with_tiny([*run, f"hydra.run.dir={tmp_path / 'r'}"]), capsys)[0] == 0
    rows, full = read_metrics(tmp_path / "r"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))
    assert [r["train/loss"] for r in rows if "train/loss" in r] == [r["train/loss"] for r in full if "train/loss" in r]


def test_disk_full_while_writing_metrics_is_one_line(tmp_path):
    from minilm.errors import RunDirError
    from tests.helpers import make_run

    trainer = make_run(["train.max_steps=3"], tmp_path)
    metrics_file = trainer.tracker._metrics_file
    full = FullDisk(metrics_file, 0)
    full.close, full.closed = metrics_file.close, False
    trainer.tracker._metrics_file = full
    with pytest.raises(RunDirError) as error:
        fit_alone(trainer)
    assert "\n" not in str(error.value) and f"could not write {tmp_path / 'metrics.jsonl'}" in str(error.value)
    assert "No space left on device" in str(error.value) and metrics_file.closed


# ---------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"step": 1, "model": Payload(str(marker))}, f)


def bad_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save_atomic({"step": 1, "model": {"w": torch.ones(1000)}}, good)
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    crafted_checkpoint(tmp_path / "crafted.pt", tmp_path / "PWNED")
    checkpoint.save_atomic({"weights": [1, 2]}, tmp_path / "foreign.pt")
    return ["garbage.pt", "empty.pt", "truncated.pt", "crafted.pt", "foreign.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["garbage.pt", "empty.pt", "truncated.pt", "crafted.pt", "foreign.pt", "none.pt"])
def test_resume_from_a_bad_checkpoint(name, tmp_path, capsys):
    bad_checkpoints(tmp_path)
    code, out, err = run_cli(with_tiny([*PLAIN, f"train.resume={tmp_path / name}", f"hydra.run.dir={tmp_path / 'r'}"]),
                             capsys)
    assert_one_line_error(code, out, err, [name])
    assert not (tmp_path / "PWNED").exists()  # the crafted payload never ran


def test_crafted_replay_bundle_is_refused_and_never_run(tmp_path, capsys):
    crafted_checkpoint(tmp_path / "step_000001.pt", tmp_path / "PWNED")
    code, out, err = run_cli([str(tmp_path / "step_000001.pt")], capsys, command=replay_main)
    assert_one_line_error(code, out, err, ["step_000001.pt", "not loaded for safety"])
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_resume_from_a_dir_without_checkpoint(tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    code, out, err = run_cli(with_tiny([*PLAIN, f"train.resume={tmp_path / 'elsewhere'}",
                                        f"hydra.run.dir={tmp_path / 'r'}"]), capsys)
    assert_one_line_error(code, out, err, ["elsewhere", "no checkpoint"])


# ---------------------------------------------------------------- reproduce and report


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, token_cache):
    from tests.helpers import run_training

    run_dir = tmp_path_factory.mktemp("logged")
    run_training([*PLAIN, "train.max_steps=2"], run_dir)
    return run_dir


def copy_with_config(run_dir, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(edit(text))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("edit, fragments", [
    (lambda text: "", ["config.yaml", "empty"]),
    (lambda text: "model: [unclosed", ["config.yaml", "unreadable"]),
    (lambda text: text + "extra_knob: 3\n", ["extra_knob", "does not know"]),
    (lambda text: text.replace("qk_norm: false", "qk_norm: maybe"), ["model.qk_norm", "boolean"]),
])
def test_reproduce_refuses_a_broken_logged_config(edit, fragments, logged_run, tmp_path, capsys):
    source = copy_with_config(logged_run, tmp_path, edit)
    code, out, err = run_cli([str(source), "--out", str(tmp_path / "again")], capsys, command=reproduce.main)
    assert_one_line_error(code, out, err, fragments)
    assert not (tmp_path / "again").exists()


@pytest.mark.slow
def test_reproduce_of_a_config_logged_before_a_key_existed_uses_its_default_and_says_so(logged_run, tmp_path, capsys):
    source = copy_with_config(logged_run, tmp_path, lambda text: yaml.safe_dump(
        {k: v for k, v in yaml.safe_load(text).items() if k != "detect_anomaly"}))
    code, out, err = run_cli([str(source), "--out", str(tmp_path / "again")], capsys, command=reproduce.main)
    assert code == 0, err
    assert "lacks detect_anomaly" in err and "schema's defaults" in err


@pytest.mark.slow
def test_reproduce_of_a_logger_none_run_warns_about_nothing(logged_run, tmp_path, capsys):
    code, out, err = run_cli([str(logged_run), "--verify", "1", "--out", str(tmp_path / "again")], capsys,
                             command=reproduce.main)
    assert code == 0, err
    assert "logger." not in err and "lacks" not in err


def test_report_on_a_dir_without_runs(tmp_path, capsys):
    assert_one_line_error(*run_cli([str(tmp_path)], capsys, command=report_cli.main), ["no runs found"])


def test_a_flag_shows_the_traceback_of_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_TRACEBACK", "1")
    with pytest.raises(Exception, match="no runs found"):
        report_cli.main([str(tmp_path)])
