"""A pipeline stage: layers [a, b) of the target, their KV caches, nothing else.

The runner is transport-free: it takes a MicroBatch and returns the next
stage's MicroBatch (or, on the last stage, a StageOutput with target tokens).
In-process executors and the distributed stage worker both drive it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.compute.compiled import MAX_ROWS, FewRowKernels
from shared.compute.distr_attention import distr_attention
from shared.compute.grammar import Grammars, NodeGrammar
from shared.compute.history import NodePaths
from shared.compute.kv_cache import KVUse, RequestKV, RowContext, allocate, kv_use
from shared.compute.model import (
    RowAttention,
    decoder_layer,
    linear,
    lm_logits,
    masked_attention,
    prompt_tile_attention,
    rope_table,
    rowwise_linear,
    tiled_linear,
    tree_attention,
)
from shared.compute.onednn import onednn_linear
from shared.compute.processing import NodeContext
from shared.compute.sampling import target_tokens, token_logprob
from shared.compute.weights import StageWeights, load_stage_weights
from shared.types.batch import MicroBatch, PipelineEvent, Row, StageOutput, TokenLogprob
from shared.types.config import NUMERICS, AttentionConfig, ModelArch, SamplingParams, stage_bounds
from shared.types.errors import ConfigError, ProtocolError, RequestError, SpecPipeError


@dataclass(frozen=True)
class RequestInfo:
    """What a stage must know about a request besides its nodes."""

    prompt_len: int  # output index of the token after position p is p + 1 - prompt_len
    sampling: SamplingParams  # used by the last stage to pick target tokens


@dataclass
class _RequestPlan:
    """One request's rows in the micro-batch and how they attend."""

    rows: torch.Tensor  # [m] row indices
    slots: torch.Tensor  # [m] KV slots the rows write
    attention: list[RowAttention]  # numerics exact: the generated rows, each attending on its own
    prompt_rows: torch.Tensor | None  # numerics exact: [p] row indices of prompt rows (position tiles), or None
    prompt_positions: list[int]  # their positions (= their prefix slots)
    keys: int  # numerics fast: L, the rows attend within the cache's first L slots
    mask: torch.Tensor | None  # numerics fast: [m, L] what each row attends to; None: all L (a decode row)
    prefill_start: int | None  # first position if the rows are a prefill chunk (see _prefill_start), else None


class StageRunner:
    def __init__(self, arch: ModelArch, weights: StageWeights, attention: AttentionConfig = AttentionConfig(),
                 numerics: str = "exact", grammars: Grammars | None = None):
        attention.check_head_dim(arch.head_dim)
        if numerics not in NUMERICS:
            raise ConfigError(f"unknown numerics '{numerics}': choose one of {', '.join(NUMERICS)}")
        self.fast = numerics != "exact"
        self.arch = arch
        self.weights = weights
        self.attention = attention
        self.distr_layers = attention.distr_layers(arch.num_layers)  # counted over the whole model
        self.dtype = weights.layers[0].qkv.dtype
        self.device = weights.layers[0].qkv.device  # the weights say where everything else lives
        self.lin = rowwise_linear  # numerics exact: one product per generated row (prompt rows: _exact_gemm)
        if self.fast:  # one GEMM per micro-batch; on a CPU through oneDNN's packed weights where it can
            self.lin = (onednn_linear(weights) if self.device.type == "cpu" else None) or F.linear
        # numerics compiled: micro-batches of up to MAX_ROWS rows through Inductor's kernels (compiled.py)
        self.few_rows = (FewRowKernels(arch, weights) if numerics == "compiled" and self.device.type == "cpu"
                        else None)
        self.is_first = weights.embed is not None
        self.is_last = weights.lm_head is not None
        # computed in fp32 and cast to the weights' dtype, as transformers does (a no-op in fp32)
        self.cos, self.sin = (t.to(self.device, self.dtype) for t in rope_table(arch, arch.max_positions))
        self.kv: dict[str, RequestKV] = {}
        self.info: dict[str, RequestInfo] = {}
        self.grammars = grammars  # last stage: the model's tokenizer for requests with a grammar
        self.paths: dict[str, NodePaths] = {}  # last stage: requests whose choice depends on each node's history
        self.matchers: dict[str, NodeGrammar] = {}  # last stage: requests with a grammar
        self.failures: dict[str, str] = {}  # request -> why forward left it out (take_failures), not yet taken

    @property
    def num_layers(self) -> int:
        return len(self.weights.layers)


    # ---- request lifecycle -------------------------------------------------------------
    def add_request(self, request_id: str, info: RequestInfo, capacity: int) -> None:
        a = self.arch
        if self.is_last and info.sampling.grammar is not None:
            if self.grammars is None:
                raise RequestError("this stage has no tokenizer for grammars")
            self.matchers[request_id] = self.grammars.node_grammar(info.sampling.grammar)
        if self.is_last and info.sampling.needs_history:
            self.paths[request_id] = NodePaths()
        self.kv[request_id] = allocate(self.num_layers, capacity, a.num_kv_heads, a.head_dim, self.dtype,
                                       self.device)
        self.info[request_id] = info

    def release(self, request_id: str) -> None:
        for table in (self.kv, self.info, self.paths, self.matchers):
            table.pop(request_id, None)

    def kv_use(self, budget: int) -> KVUse:
        """The KV slots this stage's requests reserve and fill, against `budget` (shared/compute/kv_cache.py)."""
        return kv_use(self.kv.values(), budget)

    def take_failures(self) -> dict[str, str]:
        """Requests the last forward calls failed alone (released, their rows left out), with why; the caller
        reports them so that the scheduler ends them."""
        failures, self.failures = self.failures, {}
        return failures

    def _fail(self, failed: dict[str, SpecPipeError]) -> None:
        for request_id, exc in failed.items():
            self.failures[request_id] = str(exc)
            self.release(request_id)

    def apply(self, events: list[PipelineEvent]) -> None:
        """Prune / commit / finish events from verification, before the next compute."""
        for event in events:
            cache, paths = self.kv.get(event.request_id), self.paths.get(event.request_id)
            if event.kind == "finish":
                self.release(event.request_id)
            elif cache is not None and event.kind == "prune":
                cache.prune(set(event.node_ids))
            elif cache is not None and event.kind == "commit":
                cache.commit(set(event.node_ids))
            if paths is not None and event.kind in ("prune", "commit"):
                (paths.prune if event.kind == "prune" else paths.commit)(event.node_ids)

    # ---- compute ---------------------------------------------------------------------------
    def forward(self, batch: MicroBatch) -> MicroBatch | StageOutput:
        """Run this stage's layers; the last stage turns hidden states into target tokens. A request whose rows
        cannot be computed (unknown here, KV full, out of order, its grammar failed) fails alone: its rows are
        left out of the output and it is released, the others compute as they would without it
        (take_failures says which and why)."""
        if not batch.rows:
            return self._empty(batch)
        contexts, failed = self._place(batch.rows)
        if failed:
            self._fail(failed)
            batch, contexts = _without(batch, contexts)
            if not batch.rows:
                return self._empty(batch)
        x = self._layers(batch, contexts)  # [n, H]
        if not self.is_last:
            return MicroBatch(batch.batch_id, batch.rows, x)
        return self._output(batch, x)

    def hidden(self, batch: MicroBatch) -> torch.Tensor:
        """Append the rows' KV to their caches and return this stage's output states [n, H]; raises if a row
        cannot be placed (forward fails that request alone instead)."""
        contexts, failed = self._place(batch.rows)
        if failed:
            raise next(iter(failed.values()))
        return self._layers(batch, contexts)

    def _place(self, rows: list[Row]) -> tuple[list[RowContext | None], dict[str, SpecPipeError]]:
        """Each row placed in its request's cache (row order within a request); a request whose rows cannot be
        is left out (None for its rows) with its error. Requests' caches are independent: one failing changes
        nothing for the others."""
        contexts: list[RowContext | None] = [None] * len(rows)
        failed: dict[str, SpecPipeError] = {}
        for request_id, indices in _by_request(rows).items():
            try:
                cache = self.kv.get(request_id)
                if cache is None:
                    raise ProtocolError(f"request {request_id} is unknown to this stage")
                for i in indices:
                    contexts[i] = cache.place(rows[i])
            except SpecPipeError as exc:
                failed[request_id] = exc
                for i in indices:
                    contexts[i] = None
        return contexts, failed

    def _layers(self, batch: MicroBatch, contexts: list[RowContext]) -> torch.Tensor:
        """This stage's layers over rows already placed (contexts[i]: row i's), their KV written: [n, H]."""
        rows = batch.rows
        x = self._input(batch)  # [n, H]
        plans = self._plan(rows, contexts)
        positions = self._index([r.position for r in rows])
        cos, sin = self.cos[positions], self.sin[positions]  # [n, d]
        lin = self.lin if self.fast else self._exact_gemm(rows)
        few_rows = self._few_rows(len(rows))
        for li, layer in enumerate(self.weights.layers):
            write_kv, attend = self._writer(plans, li), self._attender(plans, li)
            if few_rows is not None:
                x = few_rows.layer(x, layer, cos, sin, write_kv, attend)
            else:
                x = decoder_layer(x, layer, self.arch, cos, sin, write_kv, attend, lin)
        return x

    def _few_rows(self, n: int) -> FewRowKernels | None:
        """The compiled kernels where a micro-batch of n rows takes them (numerics compiled, 1..MAX_ROWS rows)."""
        return self.few_rows if 0 < n <= MAX_ROWS else None

    def _index(self, values: list[int]) -> torch.Tensor:
        """A per-step index tensor on this stage's device."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _is_prompt(self, row: Row) -> bool:
        """Prompt rows (positions below the prompt length) are alike in every policy, so they may share tiles."""
        return row.position < self.info[row.request_id].prompt_len

    def _exact_gemm(self, rows: list[Row]):
        """Prompt rows in PROMPT_ROW_TILE-row GEMMs, generated rows one by one: a row's product depends only on
        its position, so every policy computes it alike."""
        is_prompt = [self._is_prompt(r) for r in rows]
        if all(is_prompt):
            return linear
        if not any(is_prompt):  # one kind of row: no gather and scatter
            return rowwise_linear
        prompt = self._index([i for i, p in enumerate(is_prompt) if p])
        generated = self._index([i for i, p in enumerate(is_prompt) if not p])
        return tiled_linear([(prompt, linear), (generated, rowwise_linear)])

    def _empty(self, batch: MicroBatch) -> MicroBatch | StageOutput:
        if self.is_last:
            return StageOutput(batch.batch_id, [], [])
        return MicroBatch(batch.batch_id, [], torch.empty(0, self.arch.hidden_size, dtype=self.dtype,
                                                         device=self.device))

    def _input(self, batch: MicroBatch) -> torch.Tensor:
        if self.is_first:
            return self.weights.embed[self._index([r.token for r in batch.rows])]
        if batch.hidden is None or batch.hidden.shape != (len(batch.rows), self.arch.hidden_size):
            raise ProtocolError(f"batch {batch.batch_id}: hidden states missing or of the wrong shape")
        return batch.hidden.to(self.device, self.dtype)

    def _plan(self, rows: list[Row], contexts: list[RowContext]) -> dict[str, _RequestPlan]:
        """What each request's rows attend to, from where they were placed."""
        return {rid: self._request_plan(rows, [(i, contexts[i]) for i in indices])
                for rid, indices in _by_request(rows).items()}

    def _request_plan(self, rows: list[Row], placed: list[tuple[int, RowContext]]) -> _RequestPlan:
        exact = [] if self.fast else [(i, ctx) for i, ctx in placed if not self._is_prompt(rows[i])]
        prompt = [] if self.fast else [(i, rows[i].position) for i, _ in placed if self._is_prompt(rows[i])]
        return _RequestPlan(
            rows=self._index([i for i, _ in placed]),
            slots=self._index([ctx.slot for _, ctx in placed]),
            attention=[_row_attention(i, ctx, self.device) for i, ctx in exact],
            prompt_rows=self._index([i for i, _ in prompt]) if prompt else None,
            prompt_positions=[p for _, p in prompt],
            **(_attention_mask([ctx for _, ctx in placed], self.device) if self.fast else {"keys": 0, "mask": None}),
            prefill_start=_prefill_start([rows[i] for i, _ in placed], [ctx for _, ctx in placed]),
        )

    def _writer(self, plans: dict[str, _RequestPlan], layer: int):
        def write_kv(k: torch.Tensor, v: torch.Tensor) -> None:  # [n, g, d] each
            for request_id, plan in plans.items():
                cache = self.kv[request_id]
                cache.k[layer, plan.slots] = k[plan.rows]
                cache.v[layer, plan.slots] = v[plan.rows]

        return write_kv

    def _attender(self, plans: dict[str, _RequestPlan], layer: int):
        a = self.arch

        def attend(q: torch.Tensor) -> torch.Tensor:  # [n, h, d] -> [n, h * d]
            out = torch.empty(q.shape[0], a.num_kv_heads, a.rep, a.head_dim, dtype=q.dtype, device=q.device)
            for request_id, plan in plans.items():
                cache = self.kv[request_id]
                if self._distr(plan, layer):
                    end = plan.prefill_start + len(plan.rows)  # keys [0, end): the prefix and the chunk itself
                    chunk = distr_attention(q[plan.rows], cache.k[layer, :end], cache.v[layer, :end], self.attention,
                                            causal=True, q_offset=plan.prefill_start)  # [m, h, d]
                    out[plan.rows] = chunk.view(-1, a.num_kv_heads, a.rep, a.head_dim)
                elif self.fast:
                    end = plan.keys
                    chunk = masked_attention(q[plan.rows], cache.k[layer, :end], cache.v[layer, :end], plan.mask)
                    out[plan.rows] = chunk.reshape(-1, a.num_kv_heads, a.rep, a.head_dim)
                else:
                    self._exact_attention(q, cache, layer, plan, out)
            return out.view(q.shape[0], -1)

        return attend

    def _exact_attention(self, q: torch.Tensor, cache: RequestKV, layer: int, plan: _RequestPlan,
                         out: torch.Tensor) -> None:
        """Prompt rows in position tiles, generated rows one by one (numerics exact). out: [n, g, r, d]."""
        a = self.arch
        if plan.prompt_rows is not None:
            tiled = prompt_tile_attention(q[plan.prompt_rows], plan.prompt_positions, cache.k[layer], cache.v[layer])
            out[plan.prompt_rows] = tiled.view(-1, a.num_kv_heads, a.rep, a.head_dim)
        tree_attention(q, cache.k[layer], cache.v[layer], plan.attention, a, out)

    def _distr(self, plan: _RequestPlan, layer: int) -> bool:
        """DistrAttention only in the config's layers, for prefill chunks of at least one query block; all else
        stays exact. layer: this stage's own index."""
        cfg = self.attention
        return (self.weights.start + layer in self.distr_layers and plan.prefill_start is not None
                and len(plan.rows) >= cfg.block_rows)

    def _output(self, batch: MicroBatch, x: torch.Tensor) -> StageOutput:
        """The last stage's output: target tokens (and logprobs) of the rows, minus the rows of requests whose
        node context (their grammar) failed: those fail alone."""
        rows = batch.rows
        for row in rows:  # every row, prompt chunks too: a node's history is what came before it
            if row.request_id in self.paths:
                self.paths[row.request_id].see(row)
        contexts, failed = self._contexts(rows)
        if failed:
            self._fail(failed)
            keep = [i for i, r in enumerate(rows) if r.request_id not in failed]
            rows, x, contexts = [rows[i] for i in keep], x[self._index(keep)], [contexts[i] for i in keep]
        return StageOutput(batch.batch_id, rows, *self._targets(rows, x, contexts))

    def _targets(self, rows: list[Row], x: torch.Tensor, contexts: list[NodeContext | None]
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Target token after each row that asked for one (-1 elsewhere), and the logprobs of the rows whose
        request asked for them (None elsewhere; [] when no row's request did). contexts: _contexts' per row."""
        wanted = [i for i, r in enumerate(rows) if r.needs_target]
        targets = [-1] * len(rows)
        if not wanted:
            return targets, []
        logits = self.logits(x[self._index(wanted)])  # [m, V]
        infos = [self.info[rows[i].request_id] for i in wanted]
        picks = target_tokens(logits, [info.sampling for info in infos],
                              [rows[i].position + 1 - info.prompt_len for i, info in zip(wanted, infos)],
                              [contexts[i] for i in wanted])
        for i, token in zip(wanted, picks):
            targets[i] = token
        if all(info.sampling.logprobs is None for info in infos):
            return targets, []
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        for j, (i, info) in enumerate(zip(wanted, infos)):
            if info.sampling.logprobs is not None:
                logprobs[i] = token_logprob(logits[j].cpu(), targets[i], info.sampling.logprobs)
        return targets, logprobs

    def _contexts(self, rows: list[Row]) -> tuple[list[NodeContext | None], dict[str, SpecPipeError]]:
        """Each row's history (penalties) and grammar mask where it wants a target and its request has them
        (None elsewhere), and the requests whose grammar failed, with the error."""
        contexts: list[NodeContext | None] = [None] * len(rows)
        failed: dict[str, SpecPipeError] = {}
        for i, row in enumerate(rows):
            rid = row.request_id
            if not row.needs_target or rid not in self.paths or rid in failed:
                continue
            try:
                contexts[i] = self._context(row)
            except SpecPipeError as exc:
                failed[rid] = exc
        return contexts, failed

    def _context(self, row: Row) -> NodeContext:
        rid = row.request_id
        text, prompt_len = self.paths[rid].history(row), self.info[rid].prompt_len
        matcher = self.matchers.get(rid)
        allowed = matcher.allowed(text[prompt_len:]) if matcher is not None else None
        return NodeContext(text[:prompt_len], text[prompt_len:], allowed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head for hidden states [n, H] -> [n, V] (last stage only)."""
        if (few_rows := self._few_rows(x.shape[0])) is not None:
            return few_rows.logits(x, self.weights.final_norm, self.weights.lm_head)
        return lm_logits(x, self.weights.final_norm, self.weights.lm_head, self.arch, self.lin)


def _by_request(rows: list[Row]) -> dict[str, list[int]]:
    """Row indices of each request, in row order."""
    by_request: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_request[row.request_id].append(i)
    return by_request


def _without(batch: MicroBatch, contexts: list[RowContext | None]) -> tuple[MicroBatch, list[RowContext]]:
    """The batch and contexts without the rows that were not placed (None)."""
    keep = [i for i, ctx in enumerate(contexts) if ctx is not None]
    hidden = batch.hidden[keep] if batch.hidden is not None else None
    return MicroBatch(batch.batch_id, [batch.rows[i] for i in keep], hidden), [contexts[i] for i in keep]


def _prefill_start(rows: list[Row], contexts: list[RowContext]) -> int | None:
    """Position of the first row if the rows are a prefill chunk: committed, at consecutive positions,
    each attending the prefix slice up to itself. Otherwise None."""
    start = rows[0].position
    chunk = all(
        row.committed and row.position == start + i and ctx.slot == row.position  # a committed row's context: [0, slot]
        for i, (row, ctx) in enumerate(zip(rows, contexts))
    )
    return start if chunk else None


def _attention_mask(placed: list[RowContext], device: torch.device) -> dict:
    """keys = L, one past the highest slot any row attends; mask [m, L]: row i attends to the slots of its context,
    or None when one row attends to all L slots (a decode step: SDPA then needs no mask)."""
    end = max(ctx.slot for ctx in placed) + 1  # a row's own slot is the highest of its context
    if len(placed) == 1 and len(placed[0].context) == end:  # distinct slots below L, L of them: all of them
        return {"keys": end, "mask": None}
    mask = torch.zeros(len(placed), end, dtype=torch.bool)
    for i, ctx in enumerate(placed):
        mask[i, ctx.context] = True
    return {"keys": end, "mask": mask.to(device)}


def _row_attention(row: int, ctx: RowContext, device: torch.device) -> RowAttention:
    length = len(ctx.context)
    if ctx.context[-1] == length - 1:  # slots 0..L-1 in order: the prefix slice itself, no gather
        return RowAttention(row, None, length)
    return RowAttention(row, torch.tensor(ctx.context, device=device), length)


def load_stage(model_dir: Path, arch: ModelArch, rank: int, world: int, dtype: torch.dtype = torch.float32,
               attention: AttentionConfig = AttentionConfig(), numerics: str = "exact",
               device: torch.device | str = "cpu", split: str = "balanced") -> StageRunner:
    """Stage `rank` of a `world`-stage split (0 of 1: the whole model; `split`: shared.types.config.stage_bounds)
    on `device`; reads only its own layers."""
    attention.check_head_dim(arch.head_dim)  # before any weights are read
    start, end = stage_bounds(arch, world, split)[rank]
    weights = load_stage_weights(model_dir, arch, start, end, dtype, torch.device(device))
    tokenizer = Path(model_dir) / "tokenizer.json"
    grammars = Grammars(tokenizer, arch.vocab_size, arch.eos_token_ids) if rank == world - 1 else None
    return StageRunner(arch, weights, attention, numerics, grammars if tokenizer.exists() else None)
