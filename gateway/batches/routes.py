"""OpenAI's Files and Batches endpoints: upload a JSONL of requests, run it as a Celery batch job.

POST /v1/files (multipart: file, purpose=batch; a bad line is that line's failure when the batch runs,
only a file too large or with too many lines is refused), GET /v1/files, GET/DELETE /v1/files/{id},
GET /v1/files/{id}/content;
POST /v1/batches (input_file_id, endpoint, completion_window=24h) enqueues the job,
GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.
Files and batches live in Redis under the cluster's prefix (gateway/batches/store.py);
the work runs in `python -m gateway.batches.worker` (gateway/batches/runner.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import Response

from gateway.batches.input import MAX_FILE_BYTES, BatchLine, parse_jsonl
from gateway.batches.schemas import Batch, BatchList, CreateBatchRequest, FileDeleted, FileList, FileObject
from gateway.batches.store import BatchStore, StoredFile
from gateway.batches.tasks import enqueue, make_celery
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.queue import QueueError

router = APIRouter()
FileId = Path(max_length=200)
BatchId = Path(max_length=200)
JSONL = {200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "description": "The file"}}


class BatchService:
    """The Files/Batches state of one gateway: the store (the gateway's Redis client) and a Celery app."""

    def __init__(self, cfg: GatewayConfig, r):
        self.cfg, self.store = cfg, BatchStore(r, cfg.prefix)
        self.celery = make_celery(cfg)

    async def enqueue(self, batch_id: str) -> None:
        def send() -> None:
            enqueue(self.celery, batch_id, retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})

        await anyio.to_thread.run_sync(send)


def get_batches(request: Request) -> BatchService:
    return request.app.state.batches


Service = Annotated[BatchService, Depends(get_batches)]


@contextlib.contextmanager
def redis_errors():
    """Redis unreachable -> 503 (as the rest of the gateway answers it)."""
    try:
        yield
    except QueueError as exc:
        raise APIError(503, "the request queue is not reachable", code="queue_unavailable") from exc


def _not_found(kind: str, id_: str) -> APIError:
    return APIError(404, f"No such {kind}: '{id_}'", param=f"{kind}_id", code=f"{kind}_not_found")


async def _file(svc: BatchService, file_id: str) -> StoredFile:
    with redis_errors():
        f = await svc.store.get_file(file_id)
    if f is None:
        raise _not_found("file", file_id)
    return f


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(400, f"the file is larger than {limit} bytes", param="file", code="file_too_large")
    return data


async def _parse(data: bytes, endpoint: str | None = None) -> list[BatchLine]:
    """parse_jsonl in a worker thread: reading a large file takes seconds of CPU."""
    return await anyio.to_thread.run_sync(parse_jsonl, data, endpoint)


@router.post("/v1/files", response_model=FileObject)
async def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[Literal["batch"], Form()],
                      svc: Service) -> dict:
    """Store a batch input file (400 only for a file too large or with too many lines: a bad line fails alone)."""
    data = await _read_upload(file, min(svc.cfg.max_file_bytes, MAX_FILE_BYTES))
    await _parse(data)
    f = StoredFile(f"file-{uuid.uuid4().hex}", len(data), int(time.time()), file.filename or "batch.jsonl", purpose)
    with redis_errors():
        await svc.store.put_file(f, data)
    return f.to_json()


@router.get("/v1/files", response_model=FileList)
async def list_files(svc: Service, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
    with redis_errors():
        files = await svc.store.list_files(limit)
    return {"object": "list", "data": [f.to_json() for f in files]}


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(svc: Service, file_id: Annotated[str, FileId]) -> dict:
    return (await _file(svc, file_id)).to_json()


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(svc: Service, file_id: Annotated[str, FileId]) -> dict:
    with redis_errors():
        if not await svc.store.delete_file(file_id):
            raise _not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content", response_class=Response, responses=JSONL)
async def file_content(svc: Service, file_id: Annotated[str, FileId]) -> Response:
    """The file's bytes (a batch's output: one JSON result per line, in input order)."""
    with redis_errors():
        data = await svc.store.file_content(file_id)
    if data is None:
        raise _not_found("file", file_id)
    return Response(data, media_type="application/jsonl")


def batch_json(fields: dict[str, str], counts: dict[str, int]) -> dict:
    """The OpenAI batch object from the stored hash and counters."""
    meta = json.loads(fields["meta"])

    def at(status: str) -> int | None:
        value = fields.get(f"{status}_at")
        return int(value) if value else None

    return {
        "id": meta["id"], "object": "batch", "endpoint": meta["endpoint"],
        "errors": json.loads(fields["errors"]) if fields.get("errors") else None,
        "input_file_id": meta["input_file_id"], "completion_window": meta["completion_window"],
        "status": fields["status"], "output_file_id": fields.get("output_file_id"),
        "error_file_id": fields.get("error_file_id"), "created_at": meta["created_at"],
        "expires_at": meta["created_at"] + 86_400, "expired_at": None,
        **{f"{s}_at": at(s) for s in ("in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled")},
        "request_counts": {"total": meta["total"], "completed": counts.get("completed", 0),
                           "failed": counts.get("failed", 0) + meta.get("invalid", 0)},
        "metadata": meta.get("metadata"), "usage": batch_usage(counts),
    }


def batch_usage(counts: dict[str, int]) -> dict:
    """OpenAI's batch usage: the tokens of the lines answered so far (never null)."""
    inputs, outputs = counts.get("input_tokens", 0), counts.get("output_tokens", 0)
    return {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": outputs,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inputs + outputs}


async def _batch(svc: BatchService, batch_id: str) -> dict:
    with redis_errors():
        fields = await svc.store.batch_fields(batch_id)
        if fields is None:
            raise _not_found("batch", batch_id)
        return batch_json(fields, await svc.store.counts(batch_id))


@router.post("/v1/batches", response_model=Batch)
async def create_batch(body: CreateBatchRequest, svc: Service) -> dict:
    """Check the input file against the endpoint, record the batch, enqueue its Celery task."""
    f = await _file(svc, body.input_file_id)
    if f.purpose != "batch":
        raise APIError(400, f"file '{f.id}' has purpose '{f.purpose}', not 'batch'", param="input_file_id")
    with redis_errors():
        content = await svc.store.file_content(f.id)
    lines = await _parse(content or b"", body.endpoint)
    if not lines:
        raise APIError(400, f"file '{f.id}' has no requests", param="input_file_id", code="invalid_file")
    batch_id = f"batch_{uuid.uuid4().hex}"
    meta = {"id": batch_id, "endpoint": body.endpoint, "input_file_id": f.id,
            "completion_window": body.completion_window, "created_at": int(time.time()), "total": len(lines),
            "invalid": sum(line.error is not None for line in lines), "metadata": body.metadata}
    with redis_errors():
        await svc.store.create_batch(meta)
    try:
        await svc.enqueue(batch_id)
    except Exception as exc:  # kombu raises its own and redis' errors
        with redis_errors():
            await svc.store.transition(batch_id, "failed", "validating")
        raise APIError(503, f"the batch queue is not reachable: {type(exc).__name__}",
                       code="queue_unavailable") from exc
    return await _batch(svc, batch_id)


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(svc: Service, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    with redis_errors():
        ids = await svc.store.list_batches(limit + 1)
    data = []
    for batch_id in ids[:limit]:
        with contextlib.suppress(APIError):  # deleted meanwhile
            data.append(await _batch(svc, batch_id))
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ids) > limit}


@router.get("/v1/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(svc: Service, batch_id: Annotated[str, BatchId]) -> dict:
    """Status and request_counts {total, completed, failed}; output_file_id once completed."""
    return await _batch(svc, batch_id)


@router.post("/v1/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(svc: Service, batch_id: Annotated[str, BatchId]) -> dict:
    """cancelling while a worker runs it (it stops and cancels its requests), cancelled at once if none does."""
    await _batch(svc, batch_id)  # 404 if unknown
    with redis_errors():
        await svc.store.transition(batch_id, "cancelling", "validating", "in_progress", "finalizing")
        if await svc.store.lease_ttl_ms(batch_id) == -2:  # nobody runs it: nothing to wait for
            await svc.store.transition(batch_id, "cancelled", "cancelling")
    return await _batch(svc, batch_id)


def install_batches(app, cfg: GatewayConfig, r) -> None:
    """Register the routes and the service (app.state.batches) on the gateway app."""
    app.state.batches = BatchService(cfg, r)
    app.include_router(router)
