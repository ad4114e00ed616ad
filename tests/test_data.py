"""Corpora, tokenizer cache and batch order."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from minilm.config import DataConfig
from minilm.data import TokenWindowSampler, is_val, stdlib_files, text_files
from minilm.data import prepare_data as prepare_data_in
from minilm.errors import DataError


def data_cfg(tmp_path, **overrides):
    base = {"source": "pystdlib", "vocab_size": 300, "val_fraction": 0.2, "max_files": 12}
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {**base, **overrides})
    OmegaConf.set_struct(cfg, False)
    cfg.cache_dir = str(tmp_path / "cache")  # where the token cache goes (paths.cache_dir in a run)
    return cfg


def prepare_data(cfg, log=print):
    cache_dir = cfg.pop("cache_dir")
    return prepare_data_in(cfg, cache_dir, log=log)


def test_stdlib_corpus_has_no_tests_or_site_packages():
    keys = [key for key, _ in stdlib_files()]
    assert len(keys) > 300 and "os.py" in keys
    assert not any(part in ("test", "tests", "site-packages") for key in keys for part in key.split("/"))
    assert not any(key.rsplit("/", 1)[-1].startswith("test_") for key in keys)
    assert keys == sorted(keys, key=lambda key: key.split("/"))  # the order max_files cuts and the cache hashes


def test_split_is_by_file_and_stable():
    assert [is_val(k, 0.3) for k in ("a.py", "b.py", "c/d.py")] == [is_val(k, 0.3) for k in ("a.py", "b.py", "c/d.py")]
    share = np.mean([is_val(f"file{i}.py", 0.3) for i in range(2000)])
    assert 0.25 < share < 0.35


@pytest.mark.slow
def test_cache_is_reused_and_corruption_is_detected_and_rebuilt(tmp_path):
    messages = []
    first = prepare_data(data_cfg(tmp_path), log=messages.append)
    train = np.array(first.train)
    assert first.vocab_size == 300 and len(train) > 1000 and train.max() < 300
    assert any("tokenizer" in m for m in messages)

    messages.clear()
    again = prepare_data(data_cfg(tmp_path), log=messages.append)
    assert messages == [] and again.fingerprint == first.fingerprint  # cached: nothing rebuilt

    with open(first.cache_dir / "train.bin", "r+b") as f:  # flip one token on disk
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    rebuilt = prepare_data(data_cfg(tmp_path), log=messages.append)
    assert any("corrupted" in m for m in messages)
    assert np.array_equal(np.array(rebuilt.train), train)


@pytest.mark.slow
def test_stale_cache_is_rebuilt(tmp_path):
    first = prepare_data(data_cfg(tmp_path))
    meta = json.loads((first.cache_dir / "meta.json").read_text())
    meta["fingerprint"] = "0" * 64
    (first.cache_dir / "meta.json").write_text(json.dumps(meta))
    messages = []
    prepare_data(data_cfg(tmp_path), log=messages.append)
    assert any("stale" in m for m in messages)


@pytest.mark.slow
def test_fingerprint_changes_with_content_and_settings(tmp_path):
    base = prepare_data(data_cfg(tmp_path)).fingerprint
    assert prepare_data(data_cfg(tmp_path, max_files=13)).fingerprint != base
    assert prepare_data(data_cfg(tmp_path, vocab_size=301)).fingerprint != base


def write_docs(folder, n=12):
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 30)
    return folder


def test_local_text_files(tmp_path):
    folder = write_docs(tmp_path / "docs")
    data = prepare_data(data_cfg(tmp_path, source="text", files=[str(folder / "*.txt")], max_files=None))
    assert "quick brown fox" in data.decode(data.train[:200])


def test_text_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    """Keys are paths below the corpus's own folder: the same files elsewhere split alike."""
    (tmp_path / "a").mkdir(), (tmp_path / "b" / "elsewhere").mkdir(parents=True)
    here, there = write_docs(tmp_path / "a" / "docs"), write_docs(tmp_path / "b" / "elsewhere" / "docs")
    keys_here = [key for key, _ in text_files([str(here / "*.txt")])]
    assert keys_here == [key for key, _ in text_files([str(there / "*.txt")])]
    assert sorted(keys_here) == sorted(f"doc{i}.txt" for i in range(12))


def test_text_glob_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        prepare_data(data_cfg(tmp_path, source="text", files=[str(tmp_path / "nothing*.txt")]))


def hf_rows(n=30, column="text", tale="once upon a time"):
    """Rows whose texts are told apart by a marker: "[doc 7]" is in the 8th row only."""
    return [{column: f"[doc {i}] {tale} " * 8, "id": i} for i in range(n)]


def all_text(data) -> str:
    return data.decode(np.concatenate([data.train, data.val]))


def hf_source(tmp_path, shape):
    """A local dataset of one of the shapes data=hf takes, and the data.* overrides that read it."""
    import datasets

    folder = tmp_path / shape
    if shape == "saved_text":
        datasets.Dataset.from_list(hf_rows()).save_to_disk(str(folder))
    elif shape == "saved_story":
        datasets.Dataset.from_list(hf_rows(column="story")).save_to_disk(str(folder))
        return folder, {"text_column": "story"}
    elif shape == "saved_splits":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(hf_rows(tale="a different tale")),
                              "validation": datasets.Dataset.from_list(hf_rows())}).save_to_disk(str(folder))
        return folder, {"split": "validation"}
    else:
        folder.mkdir()
        rows = hf_rows()
        for part in range(3):  # three files of ten rows: one row per line for .txt and .jsonl
            chunk = rows[part * 10:(part + 1) * 10]
            path = folder / f"part{part}.{shape}"
            if shape == "txt":
                path.write_text("\n".join(row["text"] for row in chunk) + "\n")
            elif shape == "jsonl":
                path.write_text("\n".join(json.dumps(row) for row in chunk) + "\n")
            else:
                datasets.Dataset.from_list(chunk).to_parquet(str(path))
    return folder, {}


# the quick tier: a saved dataset, a JSON lines folder and a parquet one
@pytest.mark.parametrize("shape", ["saved_text", "jsonl", "parquet", *(pytest.param(s, marks=pytest.mark.slow)
                                                                     for s in ("saved_story", "saved_splits", "txt"))])
def test_hf_reads_every_local_dataset_shape(tmp_path, shape):
    folder, overrides = hf_source(tmp_path, shape)
    data = prepare_data(data_cfg(tmp_path, source="hf", name=str(folder), max_files=None, **overrides))
    text = all_text(data)
    assert all(f"[doc {i}] once upon a time" in text for i in range(30))  # every row, of the chosen split only
    assert "different tale" not in text


def test_the_same_rows_saved_or_in_files_share_one_cache(tmp_path):
    saved, _ = hf_source(tmp_path, "saved_text")
    files, _ = hf_source(tmp_path, "jsonl")
    from_disk, from_files = (prepare_data(data_cfg(tmp_path, source="hf", name=str(f), max_files=None))
                             for f in (saved, files))
    assert from_disk.fingerprint == from_files.fingerprint and from_disk.cache_dir == from_files.cache_dir


@pytest.mark.parametrize("shape", ["saved_splits", "jsonl"])
def test_a_missing_split_is_one_line_naming_the_splits(tmp_path, shape):
    folder, _ = hf_source(tmp_path, shape)
    with pytest.raises(DataError) as error:
        prepare_data(data_cfg(tmp_path, source="hf", name=str(folder), split="test"))
    message = str(error.value)
    assert "\n" not in message and "data.split='test'" in message
    assert ("train, validation" if shape == "saved_splits" else "choose one of train") in message


@pytest.mark.parametrize("column", ["body", "id"])
def test_a_wrong_text_column_is_one_line_naming_the_columns(tmp_path, column):
    folder, _ = hf_source(tmp_path, "jsonl")
    with pytest.raises(DataError) as error:
        prepare_data(data_cfg(tmp_path, source="hf", name=str(folder), text_column=column))
    message = str(error.value)
    assert "\n" not in message and f"data.text_column={column!r}" in message
    assert "'text' (string), 'id' (int64)" in message  # every column, and which hold text


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_local_dataset_is_never_written_into(tmp_path):
    """datasets.map on a load_from_disk dataset writes its cache files next to the data unless told otherwise."""
    folders = [hf_source(tmp_path, shape) for shape in ("saved_text", "saved_splits", "jsonl")]
    before = [snapshot(folder) for folder, _ in folders]
    for folder, overrides in folders:
        prepare_data(data_cfg(tmp_path, source="hf", name=str(folder), max_files=None, num_proc=2, **overrides))
    assert [snapshot(folder) for folder, _ in folders] == before


@pytest.mark.slow
def test_hf_data_writes_only_under_the_cache_dir(tmp_path):
    """A run on local datasets writes nothing under HOME (datasets' default cache is ~/.cache/huggingface)."""
    import os
    import subprocess
    import sys

    folders = [hf_source(tmp_path, shape) for shape in ("saved_text", "txt", "parquet")]
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "XDG_CACHE_HOME"}
    env["HOME"] = str(home)
    script = (
        "import sys; from omegaconf import OmegaConf; from minilm.config import DataConfig; "
        "from minilm.data import prepare_data\n"
        "for name in sys.argv[2:]:\n"
        "    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {'source': 'hf', 'name': name, "
        "'vocab_size': 300, 'val_fraction': 0.2, 'num_proc': 2})\n"
        "    print(prepare_data(cfg, sys.argv[1]).cache_dir)"
    )
    job = subprocess.run([sys.executable, "-c", script, str(cache), *(str(f) for f, _ in folders)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert job.returncode == 0, job.stderr[-2000:]
    assert [p for p in home.rglob("*") if p.is_file()] == []
    token_caches = [Path(line) for line in job.stdout.split()]
    assert len(token_caches) == 3 and all(c.parent == cache and (c / "train.bin").exists() for c in token_caches)


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    import socket

    def refuse(*_args, **_kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(DataError) as error:
        prepare_data(data_cfg(tmp_path, source="hf", name="someone/some-dataset"))
    message = str(error.value)
    assert "\n" not in message and "unreachable" in message and "data=pystdlib" in message


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    single = TokenWindowSampler(tokens, block_size=8, batch_size=8, seed=3)
    ranks = [TokenWindowSampler(tokens, block_size=8, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, _ = single.next_batch()
        parts = [s.next_batch()[0] for s in ranks]
        assert not set(parts[0][:, 0].tolist()) & set(parts[1][:, 0].tolist())
        assert np.array_equal(np.concatenate([p.numpy() for p in parts]), x.numpy())


def test_sampler_resumes_exactly_and_targets_are_shifted_inputs():
    tokens = np.arange(500, dtype=np.uint16)
    sampler = TokenWindowSampler(tokens, block_size=10, batch_size=4, seed=0)
    for _ in range(20):  # crosses epoch boundaries (49 windows, 12 batches per epoch)
        sampler.next_batch()
    resumed = TokenWindowSampler(tokens, block_size=10, batch_size=4, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    for _ in range(15):
        (x, y), (x2, y2) = sampler.next_batch(), resumed.next_batch()
        assert (x == x2).all() and (y == y2).all() and (y[:, :-1] == x[:, 1:]).all()


@pytest.mark.slow
def test_two_processes_building_one_fresh_cache_both_succeed(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; from omegaconf import OmegaConf; from minilm.config import DataConfig; "
        "from minilm.data import prepare_data; "
        "cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {'vocab_size': 300, 'max_files': 30}); "
        "data = prepare_data(cfg, sys.argv[1]); print(data.fingerprint, len(data.train))"
    )
    jobs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-1500:] for _, err in results]
    assert results[0][0] == results[1][0]  # the same cache, read by both
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_a_corrupt_tokenizer_in_the_cache_is_rebuilt(tmp_path):
    first = prepare_data(data_cfg(tmp_path))
    (first.cache_dir / "tokenizer.json").write_text("{not json")
    messages = []
    again = prepare_data(data_cfg(tmp_path), log=messages.append)
    assert any("tokenizer.json checksum differs" in m for m in messages)
    assert again.encode("def main():") == first.encode("def main():")


@pytest.mark.parametrize("tamper", [{"dtype": "uint32"}, pytest.param({"dtype": "int16"}, marks=pytest.mark.slow),
                                    pytest.param({"vocab_size": 70_000}, marks=pytest.mark.slow),
                                    {"tokens": {"train": 1, "val": 1}}])
def test_a_wrong_meta_json_is_detected_and_rebuilt(tmp_path, tamper):
    """meta.json says how to read the token files: a wrong dtype would read garbage ids."""
    cfg = data_cfg(tmp_path, source="text", files=[str(write_docs(tmp_path / "docs") / "*.txt")], max_files=None)
    first = prepare_data(cfg.copy())
    meta_path = first.cache_dir / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **tamper}))
    messages = []
    again = prepare_data(cfg.copy(), log=messages.append)
    assert any("corrupted (meta.json" in m for m in messages), messages
    assert np.array_equal(np.array(again.train), np.array(first.train)) and again.train.dtype == np.uint16


def test_an_empty_minilm_cache_means_the_default_cache_dir(tmp_path, monkeypatch):
    """MINILM_CACHE= (set, empty) is unset, as XDG treats an empty XDG_CACHE_HOME: not the current dir."""
    from minilm.launch.cli import compose

    docs = write_docs(tmp_path / "docs")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MINILM_CACHE", "")
    environ = os.environ
    cfg = compose(["data=text", f"data.files=[{docs}/*.txt]", "data.vocab_size=300"])
    data = prepare_data_in(cfg.data, cfg.paths.cache_dir, log=print)
    assert data.cache_dir.parent == home / ".cache" / "minilm"
    assert list(work.iterdir()) == []
    assert os.environ is environ  # datasets' map(num_proc=...) rebinds it: monkeypatch could not undo this test
