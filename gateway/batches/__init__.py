"""Batch jobs (OpenAI's Files and Batches API) on Celery.

    input.py    the JSONL input format, checked line by line
    schemas.py  the Files/Batches objects (pydantic, for the OpenAPI spec)
    store.py    files and batches in Redis, every racy change one Lua script
    routes.py   /v1/files and /v1/batches on the gateway app; enqueues jobs
    runner.py   runs (or resumes) one batch through the gateway's request path
    tasks.py    the Celery app (make_celery) and the worker's task
    worker.py   `python -m gateway.batches.worker`, the batch worker process
"""
