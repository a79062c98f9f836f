"""Running one batch job: every line through the gateway's own request path, each result recorded once.

Contract (what makes a batch resumable with no request done twice):
  * one runner at a time per batch: a lease key with a TTL that the runner
    refreshes; a second runner finds it held and raises LeaseBusy (the Celery
    task retries later, so a dead holder's batch is taken over once its lease
    expires);
  * line i's request id is deterministic: `{kind}-{batch_id}-{i}` (and `-{k}`
    for retry k after a 429/503/504), and it is published at most once (SADD and
    XADD in one Lua script); a resumed runner that finds the id already
    published does not publish again but reads its out stream from the start;
  * a finished line's result is stored with HSETNX under its custom_id (and the
    completed/failed counter bumped in the same script) before the line counts
    as done; a resumed runner skips every custom_id already stored.
Each line is parsed, checked, tokenized and answered by the same functions as
POST /v1/chat/completions and /v1/completions (non-streamed), so a line's
`response.body` is what the HTTP endpoint returns for that body (`id` and
`created` aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from gateway.batches.input import INVALID_LINE, BatchLine, check_body, parse_jsonl
from gateway.batches.store import ACTIVE, TERMINAL, BatchStore, StoredFile
from gateway.codec import TextCodec
from gateway.completions import check_request, full_body
from gateway.config import GatewayConfig
from gateway.engine import Engine
from gateway.errors import APIError, bad_request, error_body
from gateway.metrics import Metrics
from gateway.logprobs import LogprobsShaper
from gateway.prompts import check_grammar, echo_texts, generation_spec, prompt_ids
from gateway.queue import AsyncQueue
from gateway.records import RecordBook, RequestRecord
from gateway.responses import ResponseBuilder
from gateway.state import GatewayState
from shared.model_store import resolve_model
from shared.wire.messages import RequestMsg

log = logging.getLogger("gateway.batch")
RETRYABLE = (429, 503, 504)
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class RunnerConfig:
    """gateway: the same settings as the gateway serving the cluster (model, prefix, limits).
    inflight: lines of one batch in the pipeline at once. lease_ttl_s: a dead runner's batch
    is taken over this long after it died. max_attempts: tries per line on 429/503/504."""

    gateway: GatewayConfig
    inflight: int = 8
    lease_ttl_s: float = 10.0
    max_attempts: int = 4
    retry_delay_s: float = 1.0  # doubled after each failed attempt
    ready_wait_s: float = 60.0  # before an attempt, wait this long at most for every heartbeat
    cancel_poll_s: float = 0.5


class LeaseBusy(Exception):
    """Another runner holds the batch; try again in `retry_in_s` seconds."""

    def __init__(self, retry_in_s: float):
        super().__init__(f"batch is being run elsewhere; retry in {retry_in_s:.1f} s")
        self.retry_in_s = retry_in_s


def request_id(line: BatchLine, batch_id: str, attempt: int) -> str:
    kind = "chatcmpl" if line.url == CHAT else "cmpl"
    return f"{kind}-{batch_id}-{line.index}" + (f"-{attempt}" if attempt else "")


def result_line(batch_id: str, line: BatchLine, rid: str, status: int, body: dict) -> dict:
    """One line of the output file (OpenAI's batch output shape); a failed one also has `error` {code, message}."""
    detail = body.get("error") or {} if status != 200 else None
    error = None if detail is None else {"code": detail.get("code") or detail.get("type"),
                                         "message": detail.get("message", "")}
    return {"id": f"{batch_id}-req-{line.index}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": rid, "body": body}, "error": error}


def invalid_line_result(batch_id: str, line: BatchLine) -> dict:
    """The result of a line that could not run (no response), for the output and error files."""
    return {"id": f"{batch_id}-req-{line.index}", "custom_id": line.custom_id, "response": None,
            "error": {"code": INVALID_LINE, "message": line.error}}


def usage_of(body: dict) -> tuple[int, int]:
    """(prompt, completion) tokens of a line's answer; (0, 0) for an error."""
    usage = body.get("usage") or {}
    return usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)


class _OncePerBatchQueue(AsyncQueue):
    """AsyncQueue whose submit publishes a request id at most once for this batch."""

    def __init__(self, cfg: GatewayConfig, batch_id: str):
        super().__init__(cfg.redis, cfg.stages)
        self.batch_id, self.store = batch_id, BatchStore(self.r, cfg.prefix)

    async def submit(self, msg: RequestMsg) -> None:
        if not await self.store.submit_once(self.batch_id, self.cfg.requests, msg):
            log.info("batch %s: %s was published before; following its out stream", self.batch_id, msg.request_id)


@functools.lru_cache(maxsize=4)
def _codec(model_dir: Path) -> TextCodec:
    return TextCodec(model_dir)


def gateway_state(cfg: GatewayConfig, queue: AsyncQueue) -> GatewayState:
    """What the HTTP routes see, built for one batch run (the codec is loaded once per process)."""
    model_dir = resolve_model(cfg.model, fetch=False)
    cfg = cfg.resolved(model_dir)
    codec, records = _codec(model_dir), RecordBook(cfg.record_limit)
    metrics = Metrics(cfg.model_name, cfg.max_prompt_tokens, lambda: 0, lambda: 0)
    return GatewayState(cfg, codec, queue, records, metrics, Engine(cfg, codec, queue, records, metrics))


class BatchRunner:
    """Runs (or resumes) one batch to a terminal status; `run()` returns that status."""

    def __init__(self, cfg: RunnerConfig, batch_id: str):
        self.cfg, self.batch_id = cfg, batch_id
        self.queue = _OncePerBatchQueue(cfg.gateway, batch_id)
        self.store = self.queue.store
        self.gw = gateway_state(cfg.gateway, self.queue)
        self.lease_lost = False

    async def close(self) -> None:
        await self.queue.close()

    async def run(self) -> str:
        fields = await self.store.batch_fields(self.batch_id)
        if fields is None:
            log.warning("batch %s does not exist", self.batch_id)
            return "missing"
        if fields["status"] in TERMINAL:
            return fields["status"]
        token = uuid.uuid4().hex
        if not await self.store.acquire(self.batch_id, token, self.cfg.lease_ttl_s):
            ttl = await self.store.lease_ttl_ms(self.batch_id)
            raise LeaseBusy(max(ttl, 0) / 1000 + 0.5)
        keeper = asyncio.create_task(self._keep_lease(token, asyncio.current_task()))
        try:
            return await self._run_locked(json.loads(fields["meta"]))
        except asyncio.CancelledError:
            if not self.lease_lost:
                raise
            return "lease_lost"  # another runner has the batch now
        finally:
            keeper.cancel()
            with contextlib.suppress(Exception):
                await self.store.release(self.batch_id, token)

    async def _keep_lease(self, token: str, main: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s / 3)
            if not await self.store.refresh(self.batch_id, token, self.cfg.lease_ttl_s):
                log.error("batch %s: lost the lease; stopping this runner", self.batch_id)
                self.lease_lost = True
                main.cancel()
                return

    async def _run_locked(self, meta: dict) -> str:
        content = await self.store.file_content(meta["input_file_id"])
        try:
            lines = parse_jsonl(content or b"", meta["endpoint"])
        except APIError as exc:
            return await self._fail(f"the input file cannot be read: {exc.message}")
        moved, status = await self.store.transition(self.batch_id, "in_progress", "validating", "in_progress")
        if not moved and status != "finalizing":
            return await self._finish_cancel(meta, lines) if status == "cancelling" else status
        if status != "finalizing":
            done = await self.store.done_ids(self.batch_id)
            todo = [line for line in lines if line.error is None and line.custom_id not in done]
            log.info("batch %s: %d of %d lines to run", self.batch_id, len(todo), len(lines))
            if not await self._run_lines(todo):
                return await self._finish_cancel(meta, lines)
            moved, status = await self.store.transition(self.batch_id, "finalizing", "in_progress")
            if not moved:
                return await self._finish_cancel(meta, lines) if status == "cancelling" else status
        await self._write_output(meta, lines)
        _, status = await self.store.transition(self.batch_id, "completed", "finalizing")
        return status

    async def _run_lines(self, todo: list[BatchLine]) -> bool:
        """Run the lines, `inflight` at a time; False if the batch was cancelled meanwhile."""
        pending = iter(todo)

        async def worker() -> None:
            for line in pending:  # a shared iterator: every line is taken by one worker
                rid, status, body = await self._line(line)
                await self.store.record_result(self.batch_id, line.custom_id,
                                               result_line(self.batch_id, line, rid, status, body), status == 200,
                                               usage_of(body))

        workers = [asyncio.create_task(worker()) for _ in range(min(self.cfg.inflight, len(todo)))]
        try:
            while workers and not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=self.cfg.cancel_poll_s)
                if await self.store.status(self.batch_id) != "in_progress":  # cancelling (or cancelled)
                    return False
            await asyncio.gather(*workers)  # raises a worker's unexpected error
            return True
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)  # cancelled lines cancel their requests

    async def _line(self, line: BatchLine) -> tuple[str, int, dict]:
        """(request id, HTTP status, body) of one line, retrying 429/503/504 with the next attempt's id."""
        attempt = await self._resume_attempt(line)
        while True:
            rid = request_id(line, self.batch_id, attempt)
            status, body = await self._answer(line, rid)
            if status not in RETRYABLE or attempt + 1 >= self.cfg.max_attempts:
                return rid, status, body
            log.warning("batch %s line %d: %d (%s), retrying", self.batch_id, line.index, status,
                        body.get("error", {}).get("message"))
            await asyncio.sleep(self.cfg.retry_delay_s * 2**attempt)
            await self._wait_ready()
            attempt += 1

    async def _wait_ready(self) -> None:
        """Until every pipeline heartbeat is there (or ready_wait_s passed): a batch waits out a restart."""
        deadline = time.monotonic() + self.cfg.ready_wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if not await self.queue.missing_components():
                    return
            await asyncio.sleep(0.5)

    async def _resume_attempt(self, line: BatchLine) -> int:
        """The last attempt published for this line (0 if none): a resumed line follows it, not a new one."""
        attempt = 0
        while attempt + 1 < self.cfg.max_attempts and await self.store.was_submitted(
                self.batch_id, request_id(line, self.batch_id, attempt + 1)):
            attempt += 1
        return attempt

    async def _answer(self, line: BatchLine, rid: str) -> tuple[int, dict]:
        """The HTTP endpoint's answer for this body: (200, completion) or (error status, OpenAI error)."""
        gw, chat = self.gw, line.url == CHAT
        try:
            req = check_body(line.url, line.body)
            check_request(req, gw)
            if (req.n or 1) > 1:
                raise bad_request("n > 1 is not supported in batches: one line per choice", "n")
            ids = await prompt_ids(req, gw.codec, chat)  # in a worker thread: the runner's loop keeps going
            await check_grammar(req, gw.codec)
            spec = generation_spec(req, ids, gw.cfg, "messages" if chat else "prompt", 0, gw.codec.vocab_size)
            if await self.store.was_submitted(self.batch_id, rid):
                record = RequestRecord(rid, gw.cfg.model_name, len(ids))
                gw.records.add(record)
            else:
                record = await gw.engine.submit(rid, spec)
            build = ResponseBuilder(rid, gw.cfg.model_name, chat)
            echo = echo_texts(req, [ids], gw.codec)[0] if req.echo_prompt() else ""
            shaper = LogprobsShaper(gw.codec, chat) if req.top_logprobs_count() is not None else None
            return 200, await full_body(gw, gw.engine.updates(record, spec), record, build, shaper, echo)
        except APIError as exc:
            return exc.status, error_body(exc.message, exc.type, exc.param, exc.code)

    async def _write_output(self, meta: dict, lines: list[BatchLine]) -> None:
        """Output file: every recorded line and every line that could not run, in input order; error file: the
        failed ones (if any). File ids are derived from the batch id, so a rerun after a crash rewrites the same
        files."""
        results = await self.store.results(self.batch_id)
        ordered = [invalid_line_result(self.batch_id, line) if line.error is not None else results[line.custom_id]
                   for line in lines if line.error is not None or line.custom_id in results]
        if not ordered:
            return
        failed = [r for r in ordered if r["response"] is None or r["response"]["status_code"] != 200]
        ids = {"output_file_id": await self._put(meta, "output", ordered)}
        if failed:
            ids["error_file_id"] = await self._put(meta, "errors", failed)
        await self.store.set_fields(self.batch_id, **ids)

    async def _put(self, meta: dict, kind: str, rows: list[dict]) -> str:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        file_id = f"file-{self.batch_id.removeprefix('batch_')}-{kind}"
        await self.store.put_file(StoredFile(file_id, len(data), int(time.time()), f"{meta['id']}_{kind}.jsonl",
                                             "batch_output"), data)
        return file_id

    async def _finish_cancel(self, meta: dict, lines: list[BatchLine]) -> str:
        await self._write_output(meta, lines)  # what finished before the cancel, as OpenAI does
        _, status = await self.store.transition(self.batch_id, "cancelled", "cancelling")
        return status

    async def _fail(self, message: str) -> str:
        errors = {"object": "list", "data": [{"code": "batch_failed", "message": message}]}
        await self.store.set_fields(self.batch_id, errors=json.dumps(errors))
        _, status = await self.store.transition(self.batch_id, "failed", *ACTIVE)
        return status


async def run_batch(cfg: RunnerConfig, batch_id: str) -> str:
    """Run or resume one batch; its terminal status (LeaseBusy if another runner holds it)."""
    runner = BatchRunner(cfg, batch_id)
    try:
        return await runner.run()
    except (LeaseBusy, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("batch %s failed", batch_id)
        with contextlib.suppress(Exception):
            await runner._fail(f"internal error in the batch worker: {type(exc).__name__}")
        raise
    finally:
        await runner.close()
