"""Checkpoints: atomic writes that keep the previous one, and loading that never runs code."""

import pytest
import torch

from minilm import checkpoint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2}, tmp_path / "last.pt")
    assert checkpoint.load(tmp_path / "last.pt") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_the_replaced_checkpoint_is_kept_as_previous(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_atomic({"step": step}, tmp_path / checkpoint.LAST, keep_previous=True)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 3
    assert checkpoint.load(tmp_path / "previous.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from minilm.seeding import rng_state, set_rng_state

    saved = rng_state()
    first = (torch.rand(3), __import__("numpy").random.rand(2).tolist(), __import__("random").random())
    checkpoint.save_atomic({"step": 1, "rng": saved}, tmp_path / "rng.pt")
    set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), __import__("numpy").random.rand(2).tolist(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
