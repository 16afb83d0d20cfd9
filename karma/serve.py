"""Online serving: `karma serve`, a FastAPI app over one checkpoint, and its search page.

    karma serve --checkpoint runs/debug/checkpoints/best              # http://127.0.0.1:8000/
    karma serve --checkpoint CKPT --export runs/export serve.token=secret serve.port=8080

    app = create_app(cfg)            # cfg.serve.checkpoint set; cfg.serve.* are the limits
    TestClient(app).post("/search", json={"user_id": "196", "query": "Comedy", "k": 10})

Routes: `POST /search` (user_id and/or history of item ids + query -> top-k items with titles,
scores and image URLs), `POST /embed` (the interest embedding u), `POST /explain` (text decoded
from u through the reconstruction head R), `GET /health`, `GET /openapi.json`, and for the page
`GET /` (karma/static/index.html), `GET /users`, `GET /users/{id}`, `GET /items` and
`GET /images/{id}`.

On start the app loads the model from the checkpoint (inference path only), the catalog and the
users' histories from the prepared dataset, encodes the catalog once (h_i feeds the history
tokens) and loads the FAISS index of a `karma export` directory or builds one. Every request's
input is checked against `serve.*` before any model work: a violation is a 4xx whose `detail`
names the field. One worker thread owns the model: it takes every request waiting in its queue
and encodes them in one batch (dynamic batching), with the prefix key/value caches of
karma/fast_user.py, then searches the index for the whole batch. With `serve.token` set, every
route except /health and the (data-free) page needs `Authorization: Bearer <token>`.
"""

import asyncio
import concurrent.futures
import hmac
import json
import queue
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from karma.config import Config, ServeConfig
from karma.errors import KarmaError
from karma.fast_user import FastUserEncoder

# ---- adapter: every call into the model and the inference API lives here --------------------


def load_inference_model(checkpoint: str | Path) -> tuple[Any, Config]:
    """(model in eval mode, its config) from a checkpoint directory."""
    from karma.checkpoint import load_model

    return load_model(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")


def encode_catalog(model: Any, prepared: Any, batch_size: int) -> Any:
    """The item tower over the prepared catalog (its image features too when the model reads
    them): `.item_emb` (N, k) and `.item_hidden` (N, d)."""
    from karma.inference import encode_catalog as encode

    image_features = prepared.model_image_features(model.cfg.model.image_dim)
    model.set_image_table(image_features)  # late image maps look up history items there
    return encode(
        model, prepared.items.texts, batch_size=batch_size, progress=True,
        image_features=image_features,
    )


def decode_interest(model: Any, user_emb: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy text from R(u) for each row of user_emb (B, k)."""
    from karma.inference import decode_from_embedding

    return decode_from_embedding(model, user_emb, max_new_tokens=max_new_tokens)


# ---- the service: catalog, users, index and the batching worker ------------------------------


@dataclass
class _Job:
    history: list[int]  # item_idx the model reads (already capped)
    query: str
    user_key: str | None
    k: int = 0  # > 0: search the index
    exclude: list[int] = field(default_factory=list)
    explain: bool = False
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Service:
    """Everything `create_app` serves; `submit` is the one way to the model (thread-safe)."""

    def __init__(self, cfg: Config) -> None:
        from karma.data import load_prepared

        scfg = cfg.serve
        if not scfg.checkpoint:
            raise KarmaError("serve.checkpoint: no checkpoint directory given (--checkpoint)")
        if scfg.num_threads > 0:
            torch.set_num_threads(scfg.num_threads)
        self.serve_cfg = scfg
        self.model, self.model_cfg = load_inference_model(scfg.checkpoint)
        prepared = load_prepared(scfg.prepared_dir or self.model_cfg.data.prepared_dir)
        self.items = prepared.items
        self.item_index = {str(i): n for n, i in enumerate(self.items.item_ids)}
        self.users = _user_sequences(prepared)
        self.catalog = encode_catalog(
            self.model, prepared, batch_size=self.model_cfg.eval.batch_size
        )
        self.index = self._load_index(scfg.export)
        self.encoder = FastUserEncoder(
            self.model, self.catalog, self.items.texts, max_cached_users=scfg.user_cache_size,
            runtime=scfg.runtime, num_threads=scfg.num_threads,
        )
        self.model_history = self.model_cfg.data.max_history
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="karma-serve-worker", daemon=True)
        self._worker.start()

    def _load_index(self, export: str) -> Any:
        from karma.evaluate import build_index_from_config
        from karma.index import load_index

        ids = [str(i) for i in self.items.item_ids]
        if not export:
            return build_index_from_config(
                self.catalog.item_emb, self.model_cfg, item_ids=ids, use_gpu=False
            )
        index = load_index(Path(export) / "index", use_gpu=False)
        if [str(i) for i in index.item_ids] != ids:
            raise KarmaError(
                f"serve.export: {export}/index holds {index.n_items} items that do not match the "
                f"catalog of {len(ids)} items (exported from another dataset?)"
            )
        if index.kind == "exact":
            # The export must come from this checkpoint: compare one stored vector.
            stored = index.cpu_index.reconstruct(0)
            if not np.allclose(stored, self.catalog.item_emb[0].numpy(), atol=1e-3):
                raise KarmaError(
                    f"serve.export: {export} was exported from another checkpoint than "
                    f"{self.serve_cfg.checkpoint} (item embeddings differ)"
                )
        return index

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    async def submit(self, job: _Job) -> dict[str, Any]:
        """Queue a job for the worker; its result: `embedding` (k,), and `rows`/`scores`
        (search) or `text` (explain)."""
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            # Take what queued up while the last batch ran: no added wait at low load.
            while len(jobs) < self.serve_cfg.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            try:
                self._process(jobs)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def _process(self, jobs: list[_Job]) -> None:
        from karma.index import search

        with torch.no_grad():
            user_emb = self.encoder.encode(
                [j.history for j in jobs], [j.query for j in jobs], [j.user_key for j in jobs]
            )  # (B, k)
        results: list[dict[str, Any]] = [{"embedding": user_emb[b]} for b in range(len(jobs))]
        searching = [b for b, j in enumerate(jobs) if j.k > 0]
        if searching:
            k = max(jobs[b].k for b in searching)
            scores, rows = search(
                self.index,
                user_emb[searching].numpy(),
                k=k,
                exclude=[jobs[b].exclude for b in searching],
                show_progress=False,
            )
            for n, b in enumerate(searching):
                keep = rows[n, : jobs[b].k] >= 0
                results[b]["rows"] = rows[n, : jobs[b].k][keep].tolist()
                results[b]["scores"] = scores[n, : jobs[b].k][keep].tolist()
        explaining = [b for b, j in enumerate(jobs) if j.explain]
        if explaining:
            texts = decode_interest(
                self.model, user_emb[explaining], self.serve_cfg.max_explain_tokens
            )
            for b, text in zip(explaining, texts):
                results[b]["text"] = text
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def item_out(self, row: int, score: float | None = None) -> dict[str, Any]:
        item_id = str(self.items.item_ids[row])
        image = self.items.image_paths[row] if self.items.image_paths else None
        return {
            "item_id": item_id,
            "title": self.items.titles[row],
            "score": score,
            "image_url": f"/images/{quote(item_id, safe='')}" if image else None,
        }


def _user_sequences(prepared: Any) -> dict[str, list[int]]:
    """Every user's whole chronological sequence (test history's uncapped `seen` + target)."""
    test = prepared.split("test")
    return {
        str(u): [int(i) for i in seen] + [int(t)]
        for u, seen, t in zip(test.user_ids, test.seen, test.targets)
    }


# ---- request and response schemas --------------------------------------------------------------


class ItemOut(BaseModel):
    item_id: str
    title: str
    score: float | None = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    items: list[ItemOut]
    history: list[str] = Field(description="item ids the model read, oldest first")
    query: str
    latency_ms: float


class EmbedResponse(BaseModel):
    embedding: list[float]
    dim: int
    history: list[str]
    latency_ms: float


class ExplainResponse(BaseModel):
    text: str = Field(description="greedy text decoded from u through the reconstruction head")
    history: list[str]
    latency_ms: float


class HealthResponse(BaseModel):
    status: str
    items: int
    users: int
    backbone: str
    interface: str
    index: str
    cached_users: int


def _request_models(scfg: ServeConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request bodies whose limits come from serve.* (and so appear in the OpenAPI schema)."""

    class UserRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: str | None = Field(
            None, max_length=200, description="a user of the prepared dataset; their history"
        )
        history: list[str] | None = Field(
            None,
            max_length=scfg.max_history,
            description="item ids, oldest first (after the user's own history when both given)",
        )
        query: str = Field("", max_length=scfg.max_query_chars)

    class SearchRequest(UserRequest):
        k: int = Field(10, ge=1, le=scfg.max_top_k)
        exclude_seen: bool = Field(True, description="drop items already in the history")

    return UserRequest, SearchRequest


def _field_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            parts.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is a 413 before any parsing."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"body: larger than serve.max_body_bytes={self.max_bytes} bytes"}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        # Chunked bodies have no length: read up to the limit, then replay what was read.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._reject(send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- the app -----------------------------------------------------------------------------------


def create_app(cfg: Config, service: Service | None = None) -> FastAPI:
    """The FastAPI app for `cfg.serve` (a prepared `service` may be shared between apps)."""
    scfg = cfg.serve
    svc = service or Service(cfg)
    UserRequest, SearchRequest = _request_models(scfg)
    bearer = HTTPBearer(auto_error=False)

    def require_token(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if not scfg.token:
            return
        given = creds.credentials if creds is not None else ""
        if not hmac.compare_digest(given.encode(), scfg.token.encode()):
            raise HTTPException(
                401,
                "Authorization: missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if service is None:  # a shared service outlives this app
            svc.close()

    app = FastAPI(
        title="karma",
        description="KARMA personalized search: one embedding pass and an index lookup.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(BodyLimit, max_bytes=scfg.max_body_bytes)
    protected = [Depends(require_token)]

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        return JSONResponse({"detail": _field_message(errors), "errors": errors}, status_code=422)

    def resolve(req: BaseModel) -> tuple[list[int], list[int], str | None]:
        """(history the model reads, items to exclude, per-user cache key) or a 4xx."""
        seq: list[int] = []
        if req.user_id is not None:
            if req.user_id not in svc.users:
                raise HTTPException(404, f"user_id: unknown user {req.user_id!r}")
            seq = list(svc.users[req.user_id])
        if req.history:
            unknown = [f"history[{j}]={i!r}" for j, i in enumerate(req.history)
                       if i not in svc.item_index]
            if unknown:
                shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                raise HTTPException(422, f"history: unknown item ids: {shown}")
            seq += [svc.item_index[i] for i in req.history]
        if not seq and not req.query.strip():
            raise HTTPException(422, "body: give a user_id, a history or a query")
        return seq[-svc.model_history :], seq, req.user_id

    def ids(rows: list[int]) -> list[str]:
        return [str(svc.items.item_ids[r]) for r in rows]

    @app.post("/search", response_model=SearchResponse, dependencies=protected)
    async def search(req: SearchRequest) -> dict:  # type: ignore[valid-type]
        """Top-k items for the user's next interest given the query."""
        start = time.perf_counter()
        history, seen, key = resolve(req)
        job = _Job(history, req.query.strip(), key, k=req.k,
                   exclude=seen if req.exclude_seen else [])
        result = await svc.submit(job)
        items = [svc.item_out(r, s) for r, s in zip(result["rows"], result["scores"])]
        return {"items": items, "history": ids(history), "query": job.query,
                "latency_ms": 1000 * (time.perf_counter() - start)}

    @app.post("/embed", response_model=EmbedResponse, dependencies=protected)
    async def embed(req: UserRequest) -> dict:  # type: ignore[valid-type]
        """The user's next-interest embedding u (L2-normalized)."""
        start = time.perf_counter()
        history, _, key = resolve(req)
        result = await svc.submit(_Job(history, req.query.strip(), key))
        emb = result["embedding"]
        return {"embedding": emb.tolist(), "dim": int(emb.shape[0]), "history": ids(history),
                "latency_ms": 1000 * (time.perf_counter() - start)}

    @app.post("/explain", response_model=ExplainResponse, dependencies=protected)
    async def explain(req: UserRequest) -> dict:  # type: ignore[valid-type]
        """Text decoded from u through the reconstruction head: what the model thinks the user
        wants next."""
        start = time.perf_counter()
        history, _, key = resolve(req)
        job = _Job(history, req.query.strip(), key, explain=True)
        result = await svc.submit(job)
        return {"text": result["text"], "history": ids(history),
                "latency_ms": 1000 * (time.perf_counter() - start)}

    @app.get("/health", response_model=HealthResponse)
    def health() -> dict:
        mcfg = svc.model_cfg.model
        return {"status": "ok", "items": svc.items.n_items, "users": len(svc.users),
                "backbone": mcfg.backbone, "interface": mcfg.interface,
                "index": svc.index.kind, "cached_users": len(svc.encoder.users)}

    @app.get("/users", dependencies=protected)
    def users(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)) -> dict:
        """User ids of the prepared dataset (for the page's picker)."""
        names = list(svc.users)
        return {"users": names[offset : offset + limit], "total": len(names)}

    @app.get("/users/{user_id}", dependencies=protected)
    def user(user_id: str) -> dict:
        """The user's history as the model reads it (the most recent items), oldest first."""
        if user_id not in svc.users:
            raise HTTPException(404, f"user_id: unknown user {user_id!r}")
        rows = svc.users[user_id][-svc.model_history :]
        return {"user_id": user_id, "history": [svc.item_out(r) for r in rows]}

    @app.get("/items", dependencies=protected)
    def items(
        q: str = Query("", max_length=scfg.max_query_chars),
        limit: int = Query(20, ge=1, le=200),
    ) -> dict:
        """Catalog items whose title contains `q` (case-insensitive), in catalog order."""
        needle = q.lower()
        rows = [r for r, t in enumerate(svc.items.titles) if needle in t.lower()][:limit]
        return {"items": [svc.item_out(r) for r in rows]}

    @app.get("/images/{item_id:path}", dependencies=protected)
    def image(item_id: str) -> FileResponse:
        row = svc.item_index.get(item_id)
        path = svc.items.image_paths[row] if row is not None and svc.items.image_paths else None
        if not path or not Path(path).is_file():
            raise HTTPException(404, f"item_id: no image for item {item_id!r}")
        return FileResponse(path)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("karma").joinpath("static/index.html").read_text()

    return app


def serve(cfg: Config) -> None:
    """Run the app with uvicorn on cfg.serve.host:port until interrupted."""
    import uvicorn

    app = create_app(cfg)
    print(f"karma serve: http://{cfg.serve.host}:{cfg.serve.port}/ (API schema at /docs)")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
