#!/usr/bin/env python3
"""Python peer of `classifier serve`: the service a good Python engineer would ship.

FastAPI on uvicorn (uvloop and httptools), one worker process per CPU, each
with its own LiteRT interpreter (XNNPACK, --threads CPU threads, 1 by default
since the workers already fill the CPUs), loaded before the worker accepts
connections. The route has the shape of the classifier's:

    POST /v1/classify   multipart/form-data: one record per file part (the
                        record's source is the file name); application/json:
                        {"sources": [URL, ...], "top_k": 3}
    -> 200 {"model": NAME, "results": [RECORD, ...]}, in request order,
       each record {"source", "predictions"} or {"source", "error"}
    GET /healthz, /readyz  200 once the worker answering has its interpreter

Decoding and resizing (Pillow, as bench/peer_common.py does) run in the
worker's thread pool, so several images decode at once; inference runs on
one thread per worker, one image at a time, since an interpreter is not
thread-safe. URLs are fetched with one shared httpx client per worker, all
the sources of a request at once. Bad requests get 400 or 415 with
{"error": "..."}.

    python3 bench/peer_service.py --model PATH|URL --labels PATH|URL \
        [--listen 127.0.0.1:8090] [--workers N] [--threads 1] [--name birds]
"""
import argparse
import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

# uvicorn starts each worker by importing this module afresh, so the
# command line reaches them through the environment.
ENV = {"model": "PEER_MODEL", "labels": "PEER_LABELS", "threads": "PEER_THREADS", "name": "PEER_NAME"}
MAX_SOURCES = 64


def read_source(where):
    if where.startswith(("http://", "https://")):
        return pc.fetch(where)
    return Path(where).read_bytes()


class Worker:
    """What one worker process holds: its interpreter and the thread that runs it."""

    def __init__(self):
        self.name = os.environ.get(ENV["name"], "birds")
        self.interp = pc.make_interpreter(read_source(os.environ[ENV["model"]]),
                                          int(os.environ.get(ENV["threads"], "1")))
        self.input = self.interp.get_input_details()[0]
        self.labels = pc.parse_labels(read_source(os.environ[ENV["labels"]]))
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.http = httpx.AsyncClient(timeout=10.0, follow_redirects=True,
                                      limits=httpx.Limits(max_connections=64))

    async def classify(self, source, data, top_k):
        try:
            batch = await run_in_threadpool(pc.preprocess, data, self.input)
            loop = asyncio.get_running_loop()
            scores = await loop.run_in_executor(self.inference, pc.infer, self.interp, batch)
            return pc.result_record(source, scores, self.labels, top_k)
        except Exception as exc:  # one bad image is its record's error, not the request's
            return {"source": source, "error": pc.describe(exc)}

    async def classify_url(self, url, top_k):
        try:
            resp = await self.http.get(url)
            if resp.status_code >= 400:
                return {"source": url, "error": f"HTTP {resp.status_code} {resp.reason_phrase}"}
        except httpx.HTTPError as exc:
            return {"source": url, "error": f"cannot fetch: {type(exc).__name__}: {exc}"}
        return await self.classify(url, resp.content, top_k)


@asynccontextmanager
async def lifespan(app):
    app.state.worker = Worker()
    yield
    await app.state.worker.http.aclose()
    app.state.worker.inference.shutdown()


app = FastAPI(lifespan=lifespan)


def error(status, message):
    return JSONResponse({"error": message}, status_code=status)


def parse_top_k(value):
    if value is None:
        return pc.TOP_K
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"bad top_k {value}: expected a whole number, 1 or more")


@app.get("/healthz")
@app.get("/readyz")
async def health():
    return {"status": "ready"}


@app.post("/v1/classify")
async def classify(request: Request):
    worker = request.app.state.worker
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            try:
                body = await request.json()
            except ValueError as exc:
                return error(400, f"bad JSON: {exc}")
            if not isinstance(body, dict) or not isinstance(body.get("sources", []), list):
                return error(400, 'bad JSON: expected {"sources": [URL, ...]}')
            sources = body.get("sources", [])
            top_k = parse_top_k(body.get("top_k"))
            if not sources:
                return error(400, 'no sources: give at least one URL in "sources"')
            if len(sources) > MAX_SOURCES:
                return error(400, f"too many sources: {len(sources)}, at most {MAX_SOURCES} in one request")
            if not all(isinstance(s, str) for s in sources):
                return error(400, "bad JSON: every source must be a URL string")
            results = await asyncio.gather(*(worker.classify_url(s, top_k) for s in sources))
        elif kind == "multipart/form-data":
            async with request.form(max_files=MAX_SOURCES) as form:
                top_k = parse_top_k(form.get("top_k"))
                files = [(v.filename or "file", await v.read()) for _, v in form.multi_items()
                         if isinstance(v, UploadFile)]
            if not files:
                return error(400, "no sources: send at least one file part")
            results = await asyncio.gather(*(worker.classify(name, data, top_k) for name, data in files))
        else:
            return error(415, f"unsupported content type ({kind or 'none'}): "
                              "send application/json or multipart/form-data")
    except ValueError as exc:
        return error(400, str(exc))
    return {"model": worker.name, "results": list(results)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="path or URL of the .tflite model")
    p.add_argument("--labels", required=True, help="path or URL of the label map (CSV id,name or text)")
    p.add_argument("--name", default="birds", help="the model's name in answers")
    p.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes [the number of CPUs]")
    p.add_argument("--threads", type=int, default=1, help="LiteRT CPU threads per worker")
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    os.environ.update({ENV["model"]: args.model, ENV["labels"]: args.labels,
                       ENV["threads"]: str(args.threads), ENV["name"]: args.name})
    import uvicorn
    uvicorn.run("peer_service:app", host=host, port=int(port), workers=args.workers,
                app_dir=str(Path(__file__).resolve().parent), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
