import os

import pytest
import torch

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken

cap_onednn_isa_if_amx_is_broken()  # before any bf16 matmul, as the entry points do

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread, here and in the train.py / scripts the tests start (they inherit the variable): at test
# shapes a second thread only adds synchronisation, and on a machine shared with other jobs a thread that waits
# for a descheduled sibling made steps many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """One token cache for the whole session, isolated from the user's ~/.cache/minilm."""
    path = os.environ.get("MINILM_TEST_CACHE") or str(tmp_path_factory.mktemp("token-cache"))
    previous = os.environ.get("MINILM_CACHE")
    os.environ["MINILM_CACHE"] = path
    yield path
    if previous is None:
        os.environ.pop("MINILM_CACHE", None)
    else:
        os.environ["MINILM_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
