"""Each canned study's expectations as code, one module per study (minilm/analysis/studies/<name>.py).

Importing the package registers every study's verdicts; `verdicts(study, sweep)` computes them.
The machinery they share (the registry, `Verdict`, the seed rule, what verdicts read) is `common.py`.
"""

from minilm.analysis.studies import (  # noqa: F401  (each module registers its study's verdicts)
    adamw_eps,
    attention_sink,
    attn_entropy,
    bf16_pure,
    curse_of_depth,
    deep_postnorm,
    dyt,
    fp8,
    grad_norm_init,
    independent_wd,
    layernorm_eps,
    lr_qknorm,
    muon_maxlogit,
    mup_transfer,
    norm_placement,
    postnorm_warmup,
    precision_matrix,
    reordered_norm,
    skip_step,
    softcap,
    warmup_lr,
    zloss,
)
from minilm.analysis.studies.common import EXPECTATIONS, NotMeasured, Verdict, expect, verdicts

__all__ = ["EXPECTATIONS", "NotMeasured", "Verdict", "expect", "verdicts"]
