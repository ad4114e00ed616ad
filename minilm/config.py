"""The typed config schema: each key's type, default and valid range, written once, side by side.

`Config` is the schema of the whole config and each field's dataclass the schema of one
config group (model, norm, precision, ...). The entry layer (minilm/launch/cli.py) registers it
with Hydra, so OmegaConf itself rejects a value of the wrong type (a bool, an int, a float,
one of an enum's choices) while composing; the YAML files in configs/ hold only what differs
from these defaults. `validate` then checks ranges and cross-field rules, and
`check_runnable` what depends on this machine (a CUDA GPU, Triton). Every failure is a
one-line ConfigError naming the key, the value and the fix.

Booleans accept true/false and, as OmegaConf parses them, yes/no, on/off and y/n; numbers
are refused for a boolean key.
"""

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from omegaconf import OmegaConf

from minilm.errors import ConfigError


class Choice(str, Enum):
    """An enum whose members compare equal to their names as strings (config values stay plain strings)."""

    def __str__(self) -> str:
        return self.value


def choices(name: str, *values: str) -> type[Choice]:
    return Choice(name, {value: value for value in values})


Placement = choices("Placement", "pre", "post", "sandwich", "reordered")
Init = choices("Init", "gpt2", "xavier", "zero_proj")
Position = choices("Position", "learned", "rope", "none")
MlpKind = choices("MlpKind", "gelu", "relu2", "swiglu")
NormKind = choices("NormKind", "layernorm", "rmsnorm", "dyt", "triton_layernorm", "triton_rmsnorm", "triton_dyt")
PrecisionName = choices("PrecisionName", "fp32", "fp16", "bf16", "bf16_pure", "fp8")
Rounding = choices("Rounding", "nearest", "stochastic", "kahan")
Fp8Recipe = choices("Fp8Recipe", "tensorwise", "rowwise")
DataSource = choices("DataSource", "pystdlib", "text", "hf")
DecodeErrors = choices("DecodeErrors", "replace", "strict")
LoggerBackend = choices("LoggerBackend", "wandb", "none")
WandbMode = choices("WandbMode", "auto", "online", "offline", "disabled")
OptimName = choices("OptimName", "adamw", "muon")
MuonAdjustLR = choices("MuonAdjustLR", "original", "match_rms_adamw")
MuonNsDtype = choices("MuonNsDtype", "auto", "bf16", "fp32")
Parametrization = choices("Parametrization", "sp", "mup")
CompileMode = choices("CompileMode", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------- range checks

Check = Callable[[Any], str | None]  # returns why the value is invalid, or None


def at_least(minimum: float) -> Check:
    return lambda v: None if v is None or v >= minimum else f"it must be >= {minimum}"


def positive(v) -> str | None:
    return None if v > 0 and math.isfinite(v) else "it must be a finite number > 0"


def finite(v) -> str | None:
    return None if math.isfinite(v) else "it must be a finite number"


def fraction(low_open: bool = False, high_open: bool = False) -> Check:
    def check(v):
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
        return None if ok else f"it must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    return check


def each_of(*valid: str) -> Check:
    return lambda v: next((f"{x!r} is not one of: {', '.join(valid)}" for x in v if x not in valid), None)


def config_key(v) -> str | None:
    return None if schema_field(v) is not None else "it must be a config key, e.g. optim.lr"


def knob(default, *checks: Check):
    """A config field: its default and the checks `validate` runs on it."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"checks": checks})
    return field(default=default, metadata={"checks": checks})


# ---------------------------------------------------------------- the schema, one dataclass per group


@dataclass
class ModelConfig:
    """The transformer's shape (configs/model/). Defaults: `model=tiny`, about 1.3M parameters."""

    n_layer: int = knob(4, at_least(1))
    n_head: int = knob(4, at_least(1))
    d_model: int = knob(128, at_least(1))
    block_size: int = knob(128, at_least(1))          # context length in tokens
    mlp_ratio: int = knob(4, at_least(1))
    dropout: float = knob(0.0, fraction(high_open=True))
    bias: bool = True                                  # biases in linears and LayerNorm
    tie_embeddings: bool = True                        # the LM head is the token embedding
    # pre: x + f(norm(x)); post: norm(x + f(x)); sandwich: x + norm(f(norm(x))); reordered: x + norm(f(x)) (OLMo 2)
    placement: Placement = Placement.pre
    # gpt2: N(0, 0.02), residual projections / sqrt(2 n_layer); xavier: Xiong et al. 2020;
    # zero_proj: gpt2's with the attention and MLP output projections at zero
    init: Init = Init.gpt2
    qk_norm: bool = False                              # normalize each head's queries and keys (Wortsman et al. 2023)
    # learned: a position table (GPT-2); rope: rotary queries and keys (Su et al. 2021); none: causal mask only
    position: Position = Position.learned
    rope_theta: float | None = knob(None, positive)    # model.position=rope: the rotary base (null: 10000)
    # gelu (GPT-2); relu2: ReLU squared (nanochat); swiglu: SiLU-gated, hidden 2/3 mlp_ratio d_model rounded up to 16
    mlp: MlpKind = MlpKind.gelu
    n_kv_head: int | None = knob(None, at_least(1))    # key/value heads (grouped-query attention); null: n_head
    logit_softcap: float | None = knob(None, positive)  # final logits cap * tanh(x / cap) in fp32; null: off
    attn_softcap: float | None = knob(None, positive)   # attention logits capped before the softmax; null: off
    attn_gate: bool = False                            # a sigmoid gate on each head's output (Qiu et al. 2025)
    embed_norm: bool = False                           # a norm right after the embedding (nanochat)
    # nanochat's small-model tricks (docs/model.md)
    value_embeds: bool = False                         # per-layer token tables added to the values through a gate
    x0_blend: bool = False                             # learned blend of the embedding into each block's input
    smear: bool = False                                # mix the previous token's embedding in through a gate
    backout: bool = False                              # subtract a learned share of the mid-depth residual
    # sp: the standard parametrization; mup: μP (Yang et al. 2022, as the mup package): hidden matrices' init
    # std / sqrt(m) and Adam LR / m (m = d_model / base_width), the head reads its input x 1/m, attention
    # logits q.k / d_head x sqrt(base d_head); equal to SP at d_model = base_width (docs/optim.md)
    parametrization: Parametrization = Parametrization.sp
    base_width: int = knob(128, at_least(1))           # parametrization=mup: the d_model at which μP is SP

    def cross_check(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                              f"pick d_model a multiple of n_head")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}: each "
                              f"key/value head serves a group of query heads; pick a divisor of n_head")
        if self.position == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"model.position=rope rotates pairs of channels, and the head size d_model/n_head = "
                              f"{self.d_model // self.n_head} is odd; pick an even head size")
        if self.rope_theta is not None and self.position != "rope":
            raise ConfigError(f"model.rope_theta={self.rope_theta} applies to model.position=rope only, not "
                              f"model.position={self.position}; drop it or set model.position=rope")
        if self.parametrization == "mup":
            self.check_mup()
        if self.backout and self.n_layer < 2:
            raise ConfigError("model.backout=true subtracts the residual after block n_layer // 2, which with "
                              f"model.n_layer={self.n_layer} is the last block; use n_layer >= 2 or backout=false")

    def check_mup(self) -> None:
        if self.base_width % self.n_head:
            raise ConfigError(f"model.base_width={self.base_width} is not divisible by model.n_head={self.n_head}: "
                              f"μP's base model is this one at d_model=base_width; pick a multiple of n_head")
        if self.init == "xavier":
            raise ConfigError("model.init=xavier scales with width by itself (embeddings too) and μP's init rules "
                              "rescale gpt2's or zero_proj's; use model.init=gpt2 or zero_proj with "
                              "model.parametrization=mup")
        if self.attn_gate:
            raise ConfigError("model.attn_gate=true maps the whole width to one gate per head, an output layer "
                              "that μP's rules here do not cover; drop attn_gate or use model.parametrization=sp")


@dataclass
class NormConfig:
    """Every normalization layer of the model (configs/norm/: one option per kind)."""

    kind: NormKind = NormKind.layernorm
    eps: float = knob(1e-5, positive)
    affine: bool = True                                # learnable gain (and bias, for LayerNorm / DyT with model.bias)
    dyt_alpha: float = knob(0.5, positive)             # dyt kinds: the initial alpha of gamma * tanh(alpha * x) + beta
    # LayerNorm Scaling (Sun et al. 2025): block l's input norms scaled by 1/sqrt(l) (pre and sandwich placements)
    depth_scaling: bool = False


@dataclass
class PrecisionConfig:
    """Autocast dtype, loss scaling, pure-bf16 rounding, fp8 recipe (configs/precision/)."""

    name: PrecisionName = PrecisionName.fp32
    tf32: bool = False                                 # CUDA: TF32 for fp32 matmuls (faster, ~10-bit mantissa)
    init_scale: float = knob(65536.0, positive)        # fp16: the GradScaler's first loss scale
    growth_interval: int = knob(2000, at_least(1))     # fp16: steps without overflow before the scale doubles
    rounding: Rounding | None = None                   # bf16_pure: how each update is rounded into the bf16 weights
    fp8_recipe: Fp8Recipe | None = None                # fp8: tensorwise or rowwise scaling (torchao float8)

    def cross_check(self) -> None:
        for key, owner in (("rounding", "bf16_pure"), ("fp8_recipe", "fp8")):
            if (getattr(self, key) is None) == (self.name == owner):
                needs = f"precision={owner} needs precision.{key}" if self.name == owner else \
                    f"precision.{key} applies to precision={owner} only, not precision={self.name}"
                raise ConfigError(f"{needs}; pick a precision option (configs/precision/) that sets it")


@dataclass
class DataConfig:
    """The corpus and its tokenizer (configs/data/). Defaults: `data=pystdlib`."""

    source: DataSource = DataSource.pystdlib
    files: list[str] | None = None                  # data=text: paths or globs, one document per file
    name: str | None = None                         # data=hf: a Hub dataset name or a local dataset dir
    subset: str | None = None                       # data=hf: the dataset's config name, if it has several
    split: str = "train"                               # data=hf
    text_column: str = "text"                          # data=hf
    vocab_size: int = knob(4096, at_least(257))        # BPE vocabulary: the 256 bytes + EOS at least
    val_fraction: float = knob(0.05, fraction(low_open=True, high_open=True))  # share of documents held out
    max_files: int | None = knob(None, at_least(1))  # only the first N documents (null: all)
    num_proc: int = knob(1, at_least(1))               # processes for tokenization
    # non-UTF-8 bytes in text files: replace (warn once) or strict (refuse)
    errors: DecodeErrors = DecodeErrors.replace

    def cross_check(self) -> None:
        if self.source == "text" and not self.files:
            raise ConfigError("data=text needs data.files; pass paths or globs, e.g. data.files='[notes/*.txt]'")
        if self.source == "hf" and not self.name:
            raise ConfigError("data=hf needs data.name: a Hub dataset name or a local dataset dir")


MUON_ONLY = ("embed_lr_ratio", "head_lr_ratio", "scalar_lr_ratio", "muon_")  # keys (prefixes) of optim=muon


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule (configs/optim/; minilm/optim/)."""

    # adamw: AdamW for every parameter; muon: Muon for the blocks' matrices, AdamW for the rest
    name: OptimName = OptimName.adamw
    lr: float = knob(3e-3, positive)                   # peak learning rate (optim=muon: of the matrices)
    min_lr_ratio: float = knob(0.1, fraction())        # cosine decays to lr * min_lr_ratio at train.max_steps
    warmup_steps: int = knob(50, at_least(0))          # linear warmup from 0
    # false: AdamW's decay, weight_decay x lr_t per step (coupled to the LR); true: weight_decay x lr_t / lr,
    # independent of the peak LR (Wortsman et al. 2023), so weight_decay is the per-step decay at the peak
    independent_weight_decay: bool = False
    weight_decay: float = knob(0.1, at_least(0), finite)  # not applied to norm gains, biases and embeddings
    beta1: float = knob(0.9, fraction(high_open=True))
    beta2: float = knob(0.95, fraction(high_open=True))
    eps: float = knob(1e-8, positive)
    z_loss: float = knob(0.0, at_least(0), finite)     # coefficient of the log(Z)^2 auxiliary loss (PaLM); 0 disables
    # optim=muon: the AdamW groups' peak LRs as multiples of optim.lr (the weight_decay, betas and eps above
    # apply to them; weight decay on an untied head only)
    embed_lr_ratio: float = knob(1.0, positive)        # token and position embeddings (and a tied head)
    head_lr_ratio: float = knob(1.0, positive)         # an untied LM head
    scalar_lr_ratio: float = knob(1.0, positive)       # norm gains, biases, scalars
    # optim=muon: momentum rises linearly from muon_momentum_start to muon_momentum over muon_momentum_warmup
    # steps (nanochat: 0.85 -> 0.95 over 300)
    muon_momentum: float = knob(0.95, fraction(high_open=True))
    muon_momentum_start: float = knob(0.85, fraction(high_open=True))
    muon_momentum_warmup: int = knob(300, at_least(0))
    muon_nesterov: bool = True
    muon_ns_steps: int = knob(5, at_least(1))          # Newton-Schulz iterations
    # the iteration's dtype (torch.optim.Muon's is always bf16); auto: the autocast dtype under precision=bf16 /
    # fp8, else fp32 (fp16's range is too narrow for it), as nanochat
    muon_ns_dtype: MuonNsDtype = MuonNsDtype.auto
    # torch.optim.Muon's adjust_lr_fn: original scales a matrix's LR by sqrt(max(1, rows / cols)) (Keller
    # Jordan); match_rms_adamw by 0.2 sqrt(max(rows, cols)), the update RMS of AdamW (Moonlight), so AdamW's
    # LR and weight decay carry over
    muon_adjust_lr: MuonAdjustLR = MuonAdjustLR.original
    # skip-step (OLMo-core's rule, minilm/optim/skip_step.py): skip, on device, an update whose loss or
    # pre-clip gradient norm is more than skip_spikes_sigma standard deviations from the mean of the last
    # skip_spikes_window steps (counted in optim/skipped_spikes)
    skip_spikes: bool = False
    skip_spikes_window: int = knob(128, at_least(2))
    skip_spikes_sigma: float = knob(6.0, positive)
    # QK-clip (Kimi K2's MuonClip, minilm/optim/qk_clip.py): after each update, scale the query and key weights
    # of every head whose max pre-softmax attention logit on the step's batch exceeded this, down to it; null: off
    qk_clip_tau: float | None = knob(None, positive)

    def cross_check(self) -> None:
        if self.name == "adamw":
            changed = [f.name for f in fields(self) if f.name.startswith(MUON_ONLY) and
                       getattr(self, f.name) != default_of(f)]
            if changed:
                raise ConfigError(f"optim.{changed[0]}={getattr(self, changed[0])} applies to optim=muon only; "
                                  f"add optim=muon or drop it")
        if self.independent_weight_decay and self.weight_decay >= 1:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} is not valid with "
                              f"optim.independent_weight_decay=true: it is the per-step decay at the peak LR and "
                              f"must be < 1 (typically 1e-4)")


@dataclass
class TrainConfig:
    """The loop's knobs."""

    max_steps: int = knob(600, at_least(0))
    batch_size: int = knob(16, at_least(1))            # sequences per micro-batch, per rank
    grad_accum: int = knob(1, at_least(1))             # micro-batches per optimizer step
    grad_clip: float = knob(1.0, at_least(0), finite)  # global-norm clip after unscaling; 0 disables
    eval_interval: int = knob(200, at_least(0))        # steps between validation passes; 0: only at the end
    eval_batches: int = knob(8, at_least(1))
    log_interval: int = knob(10, at_least(1))          # steps between host syncs for metrics and the progress bar
    ckpt_interval: int = knob(200, at_least(0))        # steps between checkpoints; 0: only at the end
    # auto: this run dir's checkpoint if any; none; or a checkpoint / run dir
    resume: str = "auto"
    # resume although math-changing keys differ (recorded as a revision)
    allow_config_change: bool = False
    # another process training in this run dir: wait for it to end instead of refusing
    wait_for_run_dir: bool = False
    sample_tokens: int = knob(200, at_least(0))        # length of the sample generated at the end; 0 disables
    compile: bool = False                              # torch.compile the model (Triton custom ops included)
    # or aot_eager: the same graph without code generation (fast to test)
    compile_backend: str = "inductor"
    # torch.compile's mode (inductor): reduce-overhead replays the step's kernels as CUDA graphs, cutting the
    # launch overhead that bounds a small model's step on a GPU; max-autotune also searches kernel configs
    compile_mode: CompileMode = CompileMode.default
    stop_on_divergence: bool = True                    # stop at the step divergence is confirmed
    # the line: ln(vocab) + margin (the loss at init sits just above ln V)
    divergence_margin: float = knob(0.5, at_least(0), finite)
    # steps a loss may stay above the line and still come back (a spike)
    divergence_window: int = knob(50, at_least(1))

    def cross_check(self) -> None:
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode={self.compile_mode} has no effect without train.compile=true; "
                              f"add train.compile=true or drop train.compile_mode")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(f"train.compile_mode={self.compile_mode} is a mode of the inductor backend, not of "
                              f"train.compile_backend={self.compile_backend}; use train.compile_backend=inductor")
        if not self.compile:
            return
        import torch._dynamo  # imported only when compiling: it takes seconds

        backends = torch._dynamo.list_backends(exclude_tags=())
        if self.compile_backend not in backends:
            raise ConfigError(f"train.compile_backend={self.compile_backend!r} is not valid; choose one of: "
                              f"{', '.join(backends)}")


@dataclass
class LoggerConfig:
    """Where metrics go besides the run dir (configs/logger/)."""

    backend: LoggerBackend = LoggerBackend.wandb
    # auto: WANDB_MODE / `wandb offline` if set, else online with credentials, else offline
    mode: WandbMode = WandbMode.auto
    project: str = "minilm"
    entity: str | None = None
    name: str | None = None                         # default: the run's sorted overrides, or its main choices
    group: str | None = None                        # default: the name without the seed, so seeds pool
    tags: list[str] = knob([])
    run_id: str | None = None                       # log into this existing W&B run (e.g. a fork continuing another)


@dataclass
class DiagnosticsConfig:
    """Stability diagnostics and non-finite forensics (configs/diagnostics/)."""

    interval: int = knob(100, at_least(0))             # sample diag/* at step 1 and every N steps; 0 disables
    spike_window: int = knob(50, at_least(1))          # steps in the rolling window behind the spike scores
    spike_sigma: float = knob(7.0, positive)           # a step this many standard deviations from its window's mean
    forensics: bool = True                             # a replay bundle at the first non-finite step
    activation_hooks: bool = False                     # with forensics: flag non-finite module outputs on every step
    numerics: bool = True                              # numerics/*: per-layer underflow / overflow in the run's format
    # on sampled steps: the first norm's output error on probe rows of small variance vs float64 (diag/norm_error/*)
    norm_probe: bool = False
    # at every evaluation: the val loss with each block skipped minus the full val loss
    # (diag/block_skip_dloss/L{i}); n_layer more evaluations each time
    block_skip: bool = False


# The figures a study can ask its report for (minilm/analysis/figures.py draws them).
FIGURES = ("loss_curves", "final_loss_vs_lr", "grad_norm_by_layer", "attn_logit_max", "attn_entropy", "attn_sink",
           "logz", "fp16_scale", "update_rms", "norm_error", "numerics", "depth_profile")


@dataclass
class StudyConfig:
    """What a canned study (configs/experiment/) tells its report; it travels with every run's config.
    Plain sweeps leave it empty and the report picks its figures from the swept keys."""

    name: str | None = None                         # the study, as in experiment=<name>: keys its verdicts
    expected: str | None = None                     # the expected outcome, in words
    source: str | None = None                       # where the expectation comes from: paper and section
    figures: list[str] = knob([], each_of(*FIGURES))  # the figures the report draws, in order
    panel: str | None = knob(None, config_key)      # the swept key that gets one panel per value


@dataclass
class PathsConfig:
    """Every directory minilm writes to (configs/paths/)."""

    cache_dir: str = "~/.cache/minilm"                 # token caches (configs/paths/default.yaml reads $MINILM_CACHE)
    outputs: str = "outputs"                           # single runs: outputs/<date>/<time>
    multirun: str = "multirun"                         # sweeps: multirun/<date>/<time>/<job>


@dataclass
class Config:
    """The whole config: one field per config group, plus the top-level keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    seed: int = knob(0, at_least(0))
    deterministic: bool = False                        # bitwise-reproducible losses (slower kernels on CUDA)
    detect_anomaly: bool = False                       # run each step under torch.autograd.detect_anomaly (slow)
    device: str = "auto"                               # auto: cuda if available, else cpu; or cpu, cuda, cuda:N


# ---------------------------------------------------------------- checks


def _show(value) -> str:
    return value.value if isinstance(value, Enum) else repr(value)


def _validate_node(node, schema: type, prefix: str) -> None:
    known = {f.name for f in fields(schema)}
    extra = sorted(set(node.keys()) - known)
    if extra:  # `+key=value` forces a key in even where the schema has none
        under = f" under {prefix[:-1]}" if prefix else ""
        raise ConfigError(f"unknown config key '{prefix}{extra[0]}'; valid keys{under}: {', '.join(sorted(known))}")
    for f in fields(schema):
        value, key = node[f.name], f"{prefix}{f.name}"
        if is_dataclass(f.type):
            _validate_node(value, f.type, f"{key}.")
            continue
        for check in f.metadata.get("checks", ()):
            reason = None if value is None else check(value)
            if reason:
                raise ConfigError(f"{key}={_show(value)} is not valid; {reason}")


def validate(cfg) -> None:
    """Range and cross-field checks of a composed config (OmegaConf checked the types)."""
    _validate_node(cfg, Config, "")
    for f in fields(Config):
        if hasattr(f.type, "cross_check"):
            OmegaConf.to_object(cfg[f.name]).cross_check()
    if cfg.norm.depth_scaling and cfg.model.placement not in ("pre", "sandwich"):
        raise ConfigError(f"norm.depth_scaling=true scales the norms at a sublayer's input, and "
                          f"model.placement={cfg.model.placement} has none there; use placement=pre or sandwich")
    parse_device(cfg.device)
    if cfg.optim.qk_clip_tau is not None and cfg.model.qk_norm:
        raise ConfigError(f"optim.qk_clip_tau={cfg.optim.qk_clip_tau} cannot clip a model with model.qk_norm=true: "
                          f"qk-norm undoes any scaling of the query and key weights, and its gains are shared by "
                          f"every head of a layer; drop one of the two (qk-norm bounds the logits already)")
    if cfg.optim.name == "muon" and cfg.precision.name == "bf16_pure":
        raise ConfigError("optim=muon cannot run with precision=bf16_pure: Muon would add its update to the bf16 "
                          "weights with round-to-nearest, losing updates below half a bf16 ulp (pure bf16's "
                          "rounding is BF16AdamW's); use precision=bf16 (fp32 weights) or optim=adamw")


@dataclass
class EnsembleLauncherConfig:
    """hydra/launcher=ensemble's settings (hydra.launcher.*), outside the job's config; the option file
    configs/hydra/launcher/ensemble.yaml takes them from here. Untyped for OmegaConf, so that a bad value
    gets check_ensemble_launcher's one-line error (train.py's preflight, before anything starts, and the
    launcher itself)."""

    _target_: str = "hydra_plugins.minilm_launchers.ensemble_launcher.EnsembleLauncher"
    max_members: Any = None  # int: at most this many members per ensemble (None: as many as memory allows)
    memory_fraction: Any = 0.8  # share of the device's free memory one ensemble's members may use (an estimate)
    n_jobs: Any = 1  # int: units (ensembles, runs alone) trained at once, each in a process of its own with
    #                  cores / n_jobs threads; > 1 also splits every group into at least n_jobs ensembles


def check_ensemble_launcher(n_jobs, max_members, memory_fraction, **_) -> None:
    """EnsembleLauncherConfig's values, each checked."""

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not integer(n_jobs) or n_jobs < 1:
        raise ConfigError(f"hydra.launcher.n_jobs={n_jobs!r} is not valid; pass an integer >= 1 (units trained at "
                          f"once), e.g. hydra.launcher.n_jobs=2")
    if max_members is not None and (not integer(max_members) or max_members < 1):
        raise ConfigError(f"hydra.launcher.max_members={max_members!r} is not valid; pass an integer >= 1, or null "
                          f"for as many as memory allows")
    if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, int | float) \
            or not 0 < memory_fraction <= 1:
        raise ConfigError(f"hydra.launcher.memory_fraction={memory_fraction!r} is not valid; pass a number in "
                          f"(0, 1], e.g. hydra.launcher.memory_fraction=0.5")


def parse_device(name: str):
    """The torch.device a `device` value names (without looking at this machine)."""
    import torch

    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    return device


def resolve_device(name: str):
    """The device a run will use on this machine."""
    import torch

    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is available; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use device=cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_runnable(cfg, device) -> None:
    """What this machine and software must offer for the config: the norm kind's kernels, fp8's torchao."""
    from minilm.norms import norm_unavailable_reason

    reason = norm_unavailable_reason(str(cfg.norm.kind), device.type)
    if reason:
        raise ConfigError(f"norm={cfg.norm.kind} cannot run on {device}: {reason}")
    if cfg.train.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"train.compile_mode=reduce-overhead replays CUDA graphs, which need a CUDA device, and "
                          f"this run is on {device}; use train.compile_mode=default there")
    if cfg.precision.name == "fp8":
        from minilm.precision.fp8 import fp8_unavailable_reason

        reason = fp8_unavailable_reason(cfg.model, str(cfg.precision.fp8_recipe),
                                        cfg.train.batch_size * cfg.model.block_size)
        if reason:
            raise ConfigError(f"precision=fp8 cannot run this config: {reason}")


def schema_field(key: str):
    """The dataclass field behind a dotted config key, or None when the schema has no such key."""
    schema, found = Config, None
    for part in key.split("."):
        if schema is None or not is_dataclass(schema):
            return None
        found = next((f for f in fields(schema) if f.name == part), None)
        if found is None:
            return None
        schema = found.type if is_dataclass(found.type) else None
    return found


def default_of(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default
