"""Corpora, tokenizer and the on-disk token cache, all through one code path.

Every source becomes a `datasets.Dataset` with columns `key` (what the train/val
split hashes: a file path or a row index) and `text`:

    pystdlib  the running interpreter's standard-library .py sources (no tests,
              no site-packages): real text on every machine, no download
    text      local files or globs, one document per file
    hf        any `datasets` dataset: a hub name or a local dataset directory (save_to_disk
              output, or a folder of data files), which is only read: `datasets`' own
              cache goes under the token cache dir too

A byte-level BPE tokenizer is trained on the train split with `tokenizers`, and
both splits are tokenized (in parallel with `datasets.map(num_proc=...)`) into
uint16/uint32 memmaps under a content fingerprint of corpus + settings. The
cache records a checksum of every file in it, and what its meta.json says (the
dtype, token counts, vocabulary size) must agree with those files; a corrupted
or stale cache is rebuilt. A lock serializes building and publishing one cache,
so concurrent jobs on a fresh cache wait for the first and share its result.

Every problem with the data (a pattern matching no file, an unreadable or
non-UTF-8 file under data.errors=strict, a broken local dataset, too little
text or disk) is a one-line DataError that names the path and the fix.
"""

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minilm.checkpoint import free_bytes
from minilm.config import PathsConfig
from minilm.errors import DataError
from minilm.seeding import torch_seed

CACHE_VERSION = 2
EOS = "<|endoftext|>"
CACHE_FILES = ("train.bin", "val.bin", "tokenizer.json")
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
logger = logging.getLogger("minilm")


# ---------------------------------------------------------------- corpora


def stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's modules, tests and site-packages left out (never walked into: walking
    site-packages took most of a second, paid by every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_STDLIB_DIRS]
        paths += [Path(folder, name) for name in names if name.endswith(".py") and not name.startswith("test_")]
    return [(path.relative_to(root).as_posix(), path) for path in sorted(paths)]


def text_files(patterns) -> list[tuple[str, Path]]:
    """The files data.files names: every entry (a path or a glob) must match at least one file. A file's
    key is its path below the folder all of them share, so the split does not change when the corpus moves."""
    files = set()
    for pattern in patterns:
        matched = [Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matched = [f for f in matched if f.is_file()]
        if not matched:
            raise DataError(f"data.files entry {pattern!r} matches no file; pass existing paths or globs, "
                            f"e.g. data.files='[notes/*.txt]'")
        files.update(matched)
    root = Path(os.path.commonpath([f.parent.resolve() for f in files]))
    return [(f.resolve().relative_to(root).as_posix(), f) for f in sorted(files)]


def read_text(path: Path, errors: str) -> tuple[str, int]:
    """A file's text and the number of bytes that were not UTF-8 (replaced by U+FFFD under errors=replace)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}; fix it or leave it out of the data") from None
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as error:
        if errors == "strict":
            raise DataError(f"{path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}); "
                            f"convert it, leave it out, or set data.errors=replace") from None
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _read_files(files: list[tuple[str, Path]], errors: str) -> dict[str, list[str]]:
    keys, texts, replaced_files, replaced_bytes = [], [], 0, 0
    for key, path in files:
        text, replaced = read_text(path, errors)
        keys.append(key)
        texts.append(text)
        replaced_files += replaced > 0
        replaced_bytes += replaced
    if not any(text.strip() for text in texts):
        raise DataError(f"all {len(files)} data file(s) are empty, e.g. {files[0][1]}; point the data at files "
                        f"with text")
    if replaced_bytes:
        logger.warning(f"{replaced_bytes} byte(s) in {replaced_files} file(s) were not UTF-8 and were replaced by "
                    f"U+FFFD; set data.errors=strict to refuse such files instead")
    return {"key": keys, "text": texts}


def load_corpus(data_cfg, cache_dir: str):
    """The corpus as a `datasets.Dataset` with `key` and `text` columns. `datasets`' own cache (its copy of a
    folder or Hub dataset) goes under `cache_dir`/huggingface, like everything else minilm caches."""
    import datasets

    if data_cfg.source in ("pystdlib", "text"):
        files = stdlib_files() if data_cfg.source == "pystdlib" else text_files(data_cfg.files)
        files = files[: data_cfg.max_files] if data_cfg.max_files else files
        return datasets.Dataset.from_dict(_read_files(files, str(data_cfg.errors)))
    return _hf_texts(_load_hf(data_cfg, cache_dir), data_cfg)


def _load_hf(data_cfg, cache_dir: str):
    """The data.split of a local dataset dir (save_to_disk output, or a folder of data files) or a Hub dataset."""
    import datasets

    local = Path(os.path.expanduser(data_cfg.name))
    if local.is_dir() and any((local / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        try:
            ds = datasets.load_from_disk(str(local))  # a save_to_disk() directory: a Dataset or a DatasetDict
        except Exception as err:  # noqa: BLE001 - datasets raises many types for a damaged directory
            raise DataError(f"the local dataset {local} cannot be loaded ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); re-save it or point data.name "
                            f"elsewhere") from None
    else:
        if not local.exists():
            _require_hub(data_cfg.name)
        try:  # every split: the split is chosen below, where a missing one can be named with the others
            ds = datasets.load_dataset(str(local) if local.exists() else data_cfg.name, data_cfg.subset,
                                       cache_dir=str(_cache_root(cache_dir) / "huggingface"))
        except Exception as err:  # noqa: BLE001 - datasets raises many types for a missing or damaged source
            first = str(err).splitlines()[0] if str(err) else ""
            raise DataError(f"could not load dataset {data_cfg.name!r} ({type(err).__name__}: {first}); check the "
                            f"name, or use data=pystdlib, or data=text data.files=[...] for local files") from None
    if not isinstance(ds, datasets.DatasetDict):
        return ds  # one saved Dataset: it has no splits to choose from
    if data_cfg.split not in ds:
        raise DataError(f"data.split={data_cfg.split!r} is not a split of {data_cfg.name!r}; choose one of "
                        f"{', '.join(ds)}")
    return ds[data_cfg.split]


def _hf_texts(ds, data_cfg):
    """The data.text_column of the first data.max_files rows as `text`, keyed by row number."""
    column = data_cfg.text_column
    if getattr(ds.features.get(column), "dtype", None) not in ("string", "large_string"):
        columns = ", ".join(f"{name!r} ({getattr(feature, 'dtype', type(feature).__name__)})"
                            for name, feature in ds.features.items())
        raise DataError(f"data.text_column={column!r} is not a text column of {data_cfg.name!r}, whose columns are "
                        f"{columns}; choose a string one")
    if data_cfg.max_files:
        ds = ds.select(range(min(data_cfg.max_files, len(ds))))
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds.add_column("key", [str(i) for i in range(len(ds))])  # in memory: nothing written next to the data


def _require_hub(name: str, timeout: float = 5.0) -> None:
    """Fail in one line, in seconds, when the Hub cannot be reached (instead of minutes of retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        raise DataError(f"data.name={name!r} needs the Hugging Face Hub ({url.hostname}), which is unreachable "
                        f"from this machine; use data=pystdlib, or data=text data.files=[...] for local files"
                        ) from None


def is_val(key: str, val_fraction: float) -> bool:
    """Stable split: a document's key hashes to the same split on every machine and run."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10_000 < val_fraction * 10_000


def corpus_fingerprint(corpus, data_cfg) -> str:
    settings = {"version": 1, "vocab_size": data_cfg.vocab_size, "val_fraction": data_cfg.val_fraction}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for batch in corpus.iter(batch_size=1000):
        for key, text in zip(batch["key"], batch["text"]):
            digest.update(key.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------- tokenizer + cache


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    fingerprint: str
    cache_dir: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def _token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _cache_problem(directory: Path, fingerprint: str) -> str | None:
    """Why the cache in `directory` cannot be used, or None if every file in it is intact."""
    from tokenizers import Tokenizer

    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
        if meta["version"] != CACHE_VERSION or meta["fingerprint"] != fingerprint:
            return "stale (fingerprint differs)"
        for name in CACHE_FILES:
            if _sha256(directory / name) != meta["sha256"][name]:
                return f"corrupted ({name} checksum differs)"
        # meta.json says how to read the files it checksums (a wrong dtype reads garbage ids): it must agree with them
        vocab_size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
        dtype = _token_dtype(vocab_size)
        if meta["vocab_size"] != vocab_size or meta["dtype"] != dtype.name or any(
                (directory / f"{split}.bin").stat().st_size != max(meta["tokens"][split], 1) * dtype.itemsize
                for split in ("train", "val")):
            return "corrupted (meta.json disagrees with the files it describes)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"corrupted ({type(err).__name__} reading it)"
    return None


@contextmanager
def _cache_lock(directory: Path, log):
    """Hold an exclusive lock on `directory`'s cache: concurrent jobs build it once, one after another."""
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building the token cache {directory}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_tokens(split_ds, path: Path, dtype, eos_id: int) -> int:
    n_tokens = sum(split_ds["n_tokens"])  # a column of ints: the ids themselves stay on disk
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(max(n_tokens, 1),))
    pos = 0
    for batch in split_ds.iter(batch_size=1000):
        for ids in batch["ids"]:
            out[pos:pos + len(ids)] = ids
            out[pos + len(ids)] = eos_id  # documents are separated by EOS
            pos += len(ids) + 1
    out.flush()
    return n_tokens


def _build_cache(corpus, data_cfg, fingerprint: str, directory: Path, log) -> None:
    val_mask = [is_val(k, data_cfg.val_fraction) for k in corpus["key"]]
    val_idx = [i for i, v in enumerate(val_mask) if v]
    train_idx = [i for i, v in enumerate(val_mask) if not v]
    if not train_idx or not val_idx:
        raise DataError(f"the corpus has {len(corpus)} documents, too few to split with data.val_fraction="
                        f"{data_cfg.val_fraction}; add documents or change data.val_fraction")
    log(f"training a {data_cfg.vocab_size}-token BPE tokenizer on {len(train_idx)} documents")
    train_ds, val_ds = corpus.select(train_idx), corpus.select(val_idx)
    tokenizer = train_tokenizer(_text_batches(train_ds), data_cfg.vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    dtype = _token_dtype(tokenizer.get_vocab_size())

    def encode(batch):
        ids = [e.ids for e in tokenizer.encode_batch(batch["text"])]
        return {"ids": ids, "n_tokens": [len(i) + 1 for i in ids]}  # + 1: the EOS after each document

    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "dtype": dtype.name, "tokens": {},
                "source": str(data_cfg.source), "vocab_size": tokenizer.get_vocab_size()}
        tokenized_dir = tmp / "tokenized"  # map's output, deleted before publishing; by default `datasets` would
        tokenized_dir.mkdir()              # write it next to the corpus's files: into the user's dataset dir
        environ = os.environ  # map(num_proc=...) rebinds os.environ to a copy of itself; keep the real one
        for split, ds in (("train", train_ds), ("val", val_ds)):
            try:
                tokenized = ds.map(encode, batched=True, num_proc=data_cfg.num_proc if len(ds) > 1 else None,
                                   remove_columns=ds.column_names, desc=f"tokenizing {split}",
                                   cache_file_name=str(tokenized_dir / f"{split}.arrow"))
            finally:
                os.environ = environ  # noqa: B003 (rebinding back is the point)
            meta["tokens"][split] = _write_tokens(tokenized, tmp / f"{split}.bin", dtype, eos_id)
        shutil.rmtree(tokenized_dir)
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta["sha256"] = {name: _sha256(tmp / name) for name in CACHE_FILES}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(directory, ignore_errors=True)  # a corrupt or stale one; the lock keeps readers out
        os.replace(tmp, directory)  # the finished cache appears at once
    except OSError as error:
        if error.errno in (28, 122):  # ENOSPC, EDQUOT
            raise DataError(f"no space left on the disk of data cache {directory.parent} while building the token "
                            f"cache; free space or point MINILM_CACHE (paths.cache_dir) elsewhere") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _text_batches(ds):
    for batch in ds.iter(batch_size=1000):
        yield batch["text"]


def _corpus_bytes(corpus) -> int:
    return sum(len(text.encode("utf-8", "replace")) for batch in corpus.iter(batch_size=1000) for text in batch["text"])


def _cache_root(cache_dir: str) -> Path:
    # empty (MINILM_CACHE= set but empty) means the default, as XDG reads an empty XDG_CACHE_HOME; "" resolves to
    # the current directory, which would scatter caches wherever a run starts
    root = Path(os.path.expanduser(str(cache_dir) or PathsConfig.cache_dir)).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise DataError(f"the token cache dir {root} is not writable ({error.strerror or error}); set "
                        f"MINILM_CACHE or paths.cache_dir to a writable dir") from None
    return root


def prepare_data(data_cfg, cache_dir: str, log=logger.info) -> TokenData:
    """Tokenized train/val splits for the configured corpus, built once and cached by content."""
    from tokenizers import Tokenizer

    corpus = load_corpus(data_cfg, cache_dir)
    if len(corpus) == 0:
        raise DataError(f"data.source={data_cfg.source} produced no documents")
    fingerprint = corpus_fingerprint(corpus, data_cfg)
    cache_root = _cache_root(cache_dir)
    directory = cache_root / f"{data_cfg.source}-{fingerprint[:16]}"
    with _cache_lock(directory, log):
        problem = _cache_problem(directory, fingerprint)
        if problem:
            # uint32 ids at most one per byte, twice over (the tokenized columns, then the memmaps)
            needed = 8 * _corpus_bytes(corpus)
            if free_bytes(cache_root) < needed:
                raise DataError(f"the token cache needs about {needed} bytes in {cache_root} and only "
                                f"{free_bytes(cache_root)} are free; free space or set MINILM_CACHE elsewhere")
            if problem != "missing":
                log(f"token cache {directory} is {problem}; rebuilding")
            _build_cache(corpus, data_cfg, fingerprint, directory, log)
    meta = json.loads((directory / "meta.json").read_text())
    train, val = (np.memmap(directory / f"{s}.bin", dtype=meta["dtype"], mode="r") for s in ("train", "val"))
    return TokenData(train, val, Tokenizer.from_file(str(directory / "tokenizer.json")), fingerprint, directory)


# ---------------------------------------------------------------- batches


class TokenWindowSampler:
    """Shuffled, non-overlapping windows of block_size+1 tokens, epoch by epoch.

    The order is a function of (seed, epoch) alone, and the position is
    (epoch, cursor), so a resumed run sees exactly the batches it would have.
    With several data-parallel ranks, each step's global batch is split into
    disjoint per-rank slices, so ranks never see the same window.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(tokens) - 1) // block_size
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise DataError(f"the train split has {len(tokens)} tokens, fewer than one batch of "
                            f"{self.global_batch} x {block_size + 1}; use more data or a smaller "
                            f"train.batch_size / model.block_size")
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(torch_seed(self.seed * 1_000_003 + self.epoch))
        return torch.randperm(self.n_windows, generator=generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.cursor + 1) * self.global_batch > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.cursor * self.global_batch + self.rank * self.batch_size
        windows = self._order[start:start + self.batch_size]
        self.cursor += 1
        return windows_to_batch(self.tokens, windows.tolist(), self.block_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


def windows_to_batch(tokens: np.ndarray, windows, block_size: int):
    rows = np.stack([tokens[w * block_size: w * block_size + block_size + 1] for w in windows]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int):
    """The same fixed validation batches every time: consecutive windows from the start."""
    n_windows = (len(tokens) - 1) // block_size
    if n_windows == 0:
        raise DataError(f"the val split has {len(tokens)} tokens, fewer than one window of {block_size + 1}; "
                        f"raise data.val_fraction or lower model.block_size")
    windows = list(range(min(n_windows, batch_size * n_batches)))
    return [windows_to_batch(tokens, windows[i:i + batch_size], block_size)
            for i in range(0, len(windows), batch_size)]
