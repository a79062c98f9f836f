"""Typed, frozen configuration for every component.

One dataclass per component, composed at the top (the CLI or a service's
``__main__``) and passed down. Nothing here reads the environment at import
time; ``from_hf_config`` and the validators only look at what they are given.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.types.errors import ConfigError
from shared.types.layer_spec import parse_layers, resolve_layers

# exact: bit-identical to plain decoding whatever the batch (one product per generated row, prompt rows in
# position tiles); fast: one GEMM per micro-batch and one masked SDPA call per request (near-ties may differ);
# compiled: fast, with micro-batches of 1-2 rows in kernels TorchInductor compiles at start (CPU; else as fast)
NUMERICS = ("exact", "fast", "compiled")
DEFAULT_NUMERICS = "fast"  # what serving wants; exact is the opt-in bit-identical mode
NUMERICS_HELP = ("fast (default): one GEMM per micro-batch and batched attention, every token the target's own "
                 "choice, differing from plain decoding only at rounding near-ties; exact: bit-identical to plain "
                 "decoding whatever the batch; compiled: fast, with steps of one or two rows in kernels TorchInductor "
                 "compiles at start (CPU only: 3-20 s more to start, one-row forwards about 30%% faster)")
MIN_DRAFT_VOCAB = 256  # a subset head's fewest frequent tokens: more than any draft's proposals per node
DRAFT_VOCAB_HELP = ("the draft model's LM head scores only the first N token ids (a BPE vocabulary's frequent ones), "
                    "end-of-sequence and each request's own tokens: a smaller head, still lossless (the target "
                    f"verifies); 0 (default): every token, else at least {MIN_DRAFT_VOCAB}")


NGRAM_SHARED_HELP = ("the n-gram draft's table across requests: where a request's own text proposes nothing, the "
                     "followers of its last tokens in the text of the requests that finished last, up to N tokens of "
                     "them (SuffixDecoding's global table); lossless, but a request's timing then depends on what "
                     "others wrote, as with a shared prefix cache. 0 (default): each request drafts from its own text")


def check_ngram_shared(n: int) -> None:
    """ConfigError unless the n-gram table across requests holds 0 (none) or more tokens."""
    if n < 0:
        raise ConfigError(f"ngram_shared must be >= 0 (0: no table across requests), not {n}")


def check_draft_vocab(n: int) -> None:
    """ConfigError unless a draft vocabulary of n tokens is 0 (every token) or at least MIN_DRAFT_VOCAB."""
    if n < 0 or 0 < n < MIN_DRAFT_VOCAB:
        raise ConfigError(f"draft_vocab must be 0 (the whole vocabulary) or at least {MIN_DRAFT_VOCAB}, not {n}")


Policy = Literal["pp", "tree", "specpipe"]
POLICIES: tuple[str, ...] = typing.get_args(Policy)
WIDTH_RULES = ("cost", "budget")
# --draft-mode -> PolicyConfig.draft_waits: the pipe waits for the draft, never does, or the width plan chooses
DRAFT_MODES: dict[str, bool | None] = {"auto": None, "wait": True, "beside": False}

LAYER_SPLITS = ("balanced", "even")
LAYER_SPLIT_HELP = ("how layers are cut into stages: balanced (a stage's default) weighs the LM head in layers' worth "
                    "of weights and gives the last stage fewer layers so no stage reads more weights per step than it "
                    "must; even cuts equal slices (vLLM's default); or the counts themselves, e.g. 19,11")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (`rope_type: llama3`), as transformers computes it: wavelengths past
    original_max_positions / low_freq_factor are divided by `factor`, those below
    original_max_positions / high_freq_factor are kept, the band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int

    @classmethod
    def from_hf(cls, rope: dict[str, Any]) -> RopeScaling:
        return cls(float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                   int(rope["original_max_position_embeddings"]))


@dataclass(frozen=True)
class ModelArch:
    """Shape of a Llama-family decoder (Llama 2/3, Qwen2, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    qkv_bias: bool  # Qwen2 has a bias on q/k/v projections, Llama does not
    max_positions: int
    eos_token_ids: tuple[int, ...]
    rope_scaling: RopeScaling | None = None  # Llama 3.x

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (attention and MLP projections; norms and biases are too small to count)."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q_out + 2 * kv_out) + 3 * self.hidden_size * self.intermediate_size

    @property
    def head_params(self) -> int:
        """Weights of the LM head, which the last stage reads every step (tied or not)."""
        return self.vocab_size * self.hidden_size

    @property
    def rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        try:
            return cls._from_hf_config(cfg)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"model config is missing or has a bad field: {exc}") from exc

    @classmethod
    def _from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ConfigError(f"unsupported model_type '{model_type}': this engine runs Llama-family decoders")
        rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}  # transformers 4.x / 5.x
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"unsupported rope type '{rope_type}' (default and llama3 RoPE are implemented)")
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_positions=int(cfg.get("max_position_embeddings", 2048)),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            rope_scaling=RopeScaling.from_hf(rope) if rope_type == "llama3" else None,
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelArch:
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_hf_config(cfg)


@dataclass(frozen=True)
class SamplingParams:
    """How the target picks each output token, and what it reports about it.

    temperature == 0 is greedy (argmax). Otherwise the token at output
    position i is drawn from the processed distribution with a generator
    seeded by (seed, i), so every policy draws the same token at i.
    Processing (shared/compute/processing.py, vLLM's order): grammar mask,
    logit bias, penalties over the node's own history, then (sampled)
    temperature, min_p, top-k, top-p. Every step is a function of the node's
    prefix alone, so speculation stays lossless.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability (after temperature)
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # tokens of prompt + output: positive logits divided, negative multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # an llguidance grammar (JSON text): every token must keep the output in it
    logprobs: int | None = None  # report the chosen token's logprob and the `logprobs` most likely; None: nothing

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0 (0 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError("min_p must be in [0, 1]")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ConfigError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0 (1 disables it)")
        if any(not -100.0 <= bias <= 100.0 or token < 0 for token, bias in self.logit_bias):
            raise ConfigError("logit_bias: token ids >= 0, biases in [-100, 100]")
        if self.logprobs is not None and self.logprobs < 0:
            raise ConfigError("logprobs must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_history(self) -> bool:
        """The choice at a node depends on the tokens before it (penalties, grammar), not only on its logits."""
        return self.penalized or self.grammar is not None

    @property
    def processed(self) -> bool:
        """Anything beyond plain argmax / temperature, top-k, top-p."""
        return self.needs_history or bool(self.logit_bias) or self.min_p > 0


def default_refill_depth(stages: int) -> int:
    """The services' --refill-depth where none is given: stages - 1 drafted levels, and 2 at least.

    A refill's levels are verified together, `stages` steps after the miss; each that hits puts the stream of
    levels behind it one step ahead (width.py: steps per cycle N + a^(R+1) / (1 - a)). With an n-gram draft the
    levels cost microseconds to draft and, at 2 stages, rows that are almost free: on the services (smollm2,
    2 stage processes, side by side) 2 levels decoded summarization 1.11x as fast as 1, MT-Bench as fast.
    Under the cost rule this is the most a refill carries: the width plan carries fewer where they cost more."""
    return max(stages - 1, 2)


@dataclass(frozen=True)
class PolicyConfig:
    """Which speculation policy the scheduler runs, and its knobs.

    pp:       one token per request in flight, no speculation.
    tree:     each round a draft tree of up to width*depth nodes crosses the
              pipe as one micro-batch; the next round starts after it exits.
    specpipe: one tree level per step (width W), up to `stages` micro-batches
              of a request in flight; after a miss the refill carries
              `refill_depth` drafted levels below the new token.
    """

    name: Policy = "specpipe"
    stages: int = 2
    width: int = 4
    depth: int = 4  # tree policy: levels per round
    refill_depth: int = 4  # specpipe: drafted levels carried by a refill micro-batch
    branch: int = 4  # draft proposals kept per expanded node
    # specpipe: "cost" sizes each request's width per step from its acceptance and the measured step cost
    # (scheduler/width.py; 0 under saturation); "budget" keeps `width` while the token budget allows
    width_rule: str = "cost"
    # specpipe: the pipe waits (bounded) for a level's drafting, as the services and the reference executor do.
    # False: the draft runs beside the pipe and is never waited for (a level enters once drafted; a refill is the
    # bonus token alone), which a draft slower than a step needs; the width plan then prices the draft's pace.
    # None: the cost rule's width plan chooses between the two at each plan, from the measured costs (beside the
    # pipe until the draft's pace is known; under the budget rule, which makes no plan, it always waits).
    draft_waits: bool | None = True
    # Step t + 1 is scheduled before step t's verification is read (vLLM's and SGLang's overlap): the scheduler
    # builds and sends it while the stages compute step t, so no step waits for the scheduler, but its rows and
    # prunes are one verification late. A row that verification would have pruned is computed by one more stage
    # (then dropped), and a miss's refill enters one step later. It pays where the per-step control path is a
    # large share of a step (GPU-sized steps of a few ms), not where a step is tens of ms (a CPU).
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ConfigError(f"unknown policy '{self.name}': choose one of {', '.join(POLICIES)}")
        if self.stages < 1:
            raise ConfigError("stages must be >= 1")
        if self.width < 1:
            raise ConfigError("width must be >= 1 (use --policy pp for no speculation)")
        if self.depth < 1 or self.refill_depth < 0 or self.branch < 1:
            raise ConfigError("depth and branch must be >= 1, refill_depth >= 0")
        if self.width_rule not in WIDTH_RULES:
            raise ConfigError(f"unknown width rule '{self.width_rule}': choose one of {', '.join(WIDTH_RULES)}")

    @property
    def lag(self) -> int:
        """Steps scheduled before the verification of the one before them is read (async_scheduling)."""
        return 1 if self.async_scheduling else 0

    @property
    def round_trip(self) -> int:
        """Steps from a row entering stage 0 to the first step scheduled after its verification."""
        return self.stages + self.lag

    @property
    def max_inflight(self) -> int:
        """Micro-batches of one request allowed in the pipe (sent and not yet verified) at once."""
        return self.round_trip if self.name == "specpipe" else 1

    @property
    def streams_levels(self) -> bool:
        return self.name == "specpipe"

    @property
    def refill_levels(self) -> int:
        """Drafted levels sent below the accepted root in one micro-batch."""
        return {"pp": 0, "tree": self.depth, "specpipe": self.refill_depth}[self.name]


DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Limits shared by the scheduler and the stage runners."""

    prefill_chunk: int = 64  # prompt tokens per prefill micro-batch
    max_new_tokens: int = 128
    dtype: str = "float32"  # the target's weights, activations and KV (fp32: bit-identical to plain decoding)
    token_budget: int = 256  # rows per micro-batch across all requests (SpecPipe-DB)
    # The draft only proposes, the target verifies: a bf16 draft stays lossless and halves the draft's memory
    # traffic (a memory-bound draft is what paces SpecPipe when its forward is slower than a pipeline step).
    draft_dtype: str = "float32"
    # > 0: the draft's LM head scores this many of the most frequent tokens and each request's own
    # (draft_worker/vocab.py), a fraction of its head's memory traffic; lossless too. 0: the whole vocabulary.
    draft_vocab: int = 0
    ngram_shared: int = 0  # > 0: the n-gram draft's table across requests, in tokens (NGRAM_SHARED_HELP); 0: none
    numerics: str = DEFAULT_NUMERICS  # NUMERICS: the target's and the draft's kernels
    device: str = "cpu"  # in-process executor: every stage and the draft on this one device (cpu, cuda, cuda:N)
    layer_split: str = "balanced"  # LAYER_SPLITS or counts "19,11": which layers each stage holds (stage_bounds)

    def __post_init__(self) -> None:
        for name in ("dtype", "draft_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} '{getattr(self, name)}': choose one of {', '.join(DTYPES)}")
        if self.numerics not in NUMERICS:
            raise ConfigError(f"unknown numerics '{self.numerics}': choose one of {', '.join(NUMERICS)}")
        if self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk must be >= 1")
        if self.token_budget < 1:
            raise ConfigError("token_budget must be >= 1")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        check_draft_vocab(self.draft_vocab)
        check_ngram_shared(self.ngram_shared)
        if self.layer_split not in LAYER_SPLITS:
            layer_counts(self.layer_split)  # ConfigError unless counts such as 19,11


ATTENTION_KINDS: tuple[str, ...] = ("exact", "distr")
# DistrAttention's choices (docs/distrattention.md): a column's bucket is the Gray code of its SimHash bits (the
# authors') or the bits; group j of the sorted order is {order[j + t·d/G]} (strided, the authors') or
# order[G·j : G·j+G]; Q' / K' per group are mean / sum (their accuracy path) or sum / the column in slot 1 (kernels)
DISTR_BUCKETS = ("gray", "binary")
DISTR_LAYOUTS = ("strided", "adjacent")
DISTR_FUSES = ("mean_sum", "sum_one")


@dataclass(frozen=True)
class AttentionConfig:
    """How a stage attends during long prefills (shared/compute/distr_attention.py; docs/distrattention.md).

    exact: every row attends with full-width Q·Kᵀ; outputs are bit-identical
           to plain decoding (the default, and the only choice that is lossless).
    distr: a prefill chunk of at least `block_rows` rows uses DistrAttention in
           the layers `layers` names, which groups columns of Q so Q·Kᵀ has
           inner dimension d / group_size; decode steps, tree verification and
           the other layers stay exact.
    """

    kind: str = "exact"
    group_size: int = 2  # G: columns fused per group; must divide the head dim (1 is exact up to rounding)
    block_rows: int = 128  # l: query rows that share one column grouping (the authors' BLOCK_M)
    hash_bits: int = 16  # SimHash projections per column; codes must fit a non-negative int64
    seed: int = 0  # seeds the SimHash projections, so a run is reproducible
    bucket: str = "gray"  # DISTR_BUCKETS
    layout: str = "strided"  # DISTR_LAYOUTS
    fuse: str = "mean_sum"  # DISTR_FUSES
    # the layers that use distr (shared/types/layer_spec.py): "all", or indices and ranges "0,3,8-12,20-"
    # (20-: 20 to the last), end-k counting from the end. end-2, the second-to-last layer, is the only setting
    # measured within 2% perplexity of exact (smollm2-135m and qwen2.5-coder-1.5b, BENCHMARKS.md)
    layers: str = "end-2"

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention '{self.kind}': choose one of {', '.join(ATTENTION_KINDS)}")
        if self.group_size < 1:
            raise ConfigError("attention group_size must be >= 1 (1 fuses nothing)")
        if self.block_rows < 1:
            raise ConfigError("attention block_rows must be >= 1")
        if not 1 <= self.hash_bits <= 62:
            raise ConfigError("attention hash_bits must be in 1..62 (the codes are int64)")
        for name, choices in (("bucket", DISTR_BUCKETS), ("layout", DISTR_LAYOUTS), ("fuse", DISTR_FUSES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown attention {name} '{getattr(self, name)}': choose one of "
                                  f"{', '.join(choices)}")
        parse_layers(self.layers)  # ConfigError unless "all" or a list of terms and ranges

    def check_head_dim(self, head_dim: int) -> None:
        """Groups of G columns must tile the head dim exactly."""
        if self.kind == "distr" and head_dim % self.group_size:
            raise ConfigError(f"attention group_size {self.group_size} does not divide the head dim {head_dim}")

    def distr_layers(self, num_layers: int) -> frozenset[int]:
        """The layers (0-based, counted over the whole model of num_layers layers) that attend with distr in
        prefill; none unless kind is distr. ConfigError when `layers` names a layer the model does not have."""
        return resolve_layers(self.layers, num_layers) if self.kind == "distr" else frozenset()


def split_layers(num_layers: int, stages: int, head_layers: float = 0.0) -> list[tuple[int, int]]:
    """Cut layers into `stages` consecutive slices [a, b). The last stage also carries the LM head, which weighs
    `head_layers` layers: the last slice is sized so that the heaviest stage is as light as it can be (the head is
    what a decode step of the last stage reads on top of its layers), the others differ by at most 1.
    head_layers = 0 gives the even cut."""
    if stages > num_layers:
        raise ConfigError(f"cannot split {num_layers} layers into {stages} stages: at most one stage per layer")
    if stages < 1:
        raise ConfigError("stages must be >= 1")
    if stages == 1:
        return [(0, num_layers)]
    even_last = num_layers // stages
    best_last, best_cost = even_last, None
    for last in range(even_last, 0, -1):  # from the even cut down: the first strictly lighter heaviest stage wins
        cost = max(-(-(num_layers - last) // (stages - 1)), last + head_layers)
        if best_cost is None or cost < best_cost:
            best_last, best_cost = last, cost
    return _consecutive(_even_counts(num_layers - best_last, stages - 1) + [best_last])


def _even_counts(num_layers: int, stages: int) -> list[int]:
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def _consecutive(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def layer_counts(split: str) -> list[int]:
    """Explicit per-stage layer counts "19,11" (digits only); ConfigError for anything else."""
    if split == "measured":  # specpipe.cluster.MEASURED: a launcher's, never a stage's
        raise ConfigError("layer split 'measured' is the launcher's (specpipe up): it times the stages once and "
                          "gives each the counts; a stage takes " + ", ".join(LAYER_SPLITS) + " or counts")
    if not all(c.strip().isdigit() for c in split.split(",")):
        raise ConfigError(f"layer split '{split}': choose {' or '.join(LAYER_SPLITS)}, or counts such as 19,11")
    return [int(c) for c in split.split(",")]


def stage_bounds(arch: ModelArch, stages: int, split: str = "balanced") -> list[tuple[int, int]]:
    """Each stage's layers [a, b) under a split rule (LAYER_SPLITS) or explicit counts "19,11"."""
    if split == "even":
        return split_layers(arch.num_layers, stages)
    if split == "balanced":
        return split_layers(arch.num_layers, stages, arch.head_params / arch.layer_params)
    counts = layer_counts(split)
    if len(counts) != stages or min(counts) < 1 or sum(counts) != arch.num_layers:
        raise ConfigError(f"layer split '{split}': {stages} counts of at least 1 that add up to the model's "
                          f"{arch.num_layers} layers")
    return _consecutive(counts)
