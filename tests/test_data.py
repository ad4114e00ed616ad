"""Corpora, tokenizer cache and batch order."""

import json

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


def test_hf_path_with_a_local_dataset(tmp_path):
    import datasets

    rows = [{"story": f"once upon a time {i} " * 20, "id": i} for i in range(30)]
    jsonl = tmp_path / "stories"
    jsonl.mkdir()
    (jsonl / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from_files = prepare_data(data_cfg(tmp_path, source="hf", name=str(jsonl), text_column="story", max_files=None))
    assert "once upon a time" in from_files.decode(from_files.train[:100])

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    from_disk = prepare_data(data_cfg(tmp_path, source="hf", name=str(saved), text_column="story", max_files=None))
    assert from_disk.fingerprint == from_files.fingerprint  # same documents, same keys, same cache

    with pytest.raises(DataError, match="text_column"):
        prepare_data(data_cfg(tmp_path, source="hf", name=str(saved), text_column="body"))


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
