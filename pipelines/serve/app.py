"""The Ray Serve application of ``isa serve``: query encoder, index shards and the HTTP ingress.

```
HTTP -> SearchIngress (FastAPI) --decoded view / pseudo-words + text + k--> QueryEncoder (@serve.batch)
                                                     --(B, D) composed queries--> IndexShard 0..S-1 -> merge_hits
```

The ingress decodes uploads (as training decoded them: :func:`isa.query.student_views`) and refuses bad
requests before any other replica sees them; the encoder batches image encodes and prompt composition of
concurrent requests and searches every index shard once per batch (one deployment per shard), their top-k
merged by :func:`pipelines.index.store.merge_hits`. ``serve deploy infra/serve/serve_config.yaml`` builds the same
application through :func:`app_builder` from the config file's ``args``.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures Serve rewrites (string annotations
# would not resolve there).
import asyncio
import dataclasses
import email.message
import importlib.resources
import io
import json
import math
import tempfile
import typing
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from isa.errors import IsaError

MiB = 1 << 20
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # served next to index.html


class ServeError(IsaError):
    """A setting of ``isa serve`` that cannot work; the message says which and why."""


@dataclass(frozen=True)
class ServeSettings:
    """What ``isa serve`` (or a Serve config file's ``args``) sets.

    Attributes:
        checkpoint: a checkpoint folder or a training run folder (its latest complete checkpoint), any fsspec URI.
        index: an ``isa index`` folder, any fsspec URI.
        host, port: where Serve's HTTP proxy listens.
        encoder_replicas: query-encoder replicas.
        max_batch: requests one encoder (and index) batch holds at most.
        batch_wait_ms: how long a batch waits for more requests once its first arrived.
        max_upload_mb: the largest request body accepted (an upload or a JSON body).
        max_k: the largest ``k`` a request may ask for.
        num_cpus: CPUs the ingress and each index-shard replica reserve (FAISS threads: this, at least 1).
        encoder_cpus: CPUs each encoder replica reserves (its torch threads, at least 1).
        encoder_gpus: GPUs per encoder replica; None: 1 when the cluster has a GPU at deploy time, else 0.
        default_k: ``k`` when a request names none.
        thumbnail: the longest side of ``GET /images/{id}`` thumbnails unless the request asks for another.
        access_log: log every request in the replicas' logs (INFO); off: warnings and errors only.
        name: the Serve application's name.
        route_prefix: where the application is mounted on the proxy.
    """

    checkpoint: str
    index: str
    host: str = "127.0.0.1"
    port: int = 8000
    encoder_replicas: int = 1
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    max_k: int = 200
    num_cpus: float = 0.25
    encoder_cpus: float = 1.0
    encoder_gpus: float | None = None
    default_k: int = 20
    thumbnail: int = 256
    access_log: bool = False
    name: str = "isa"
    route_prefix: str = "/"

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServeSettings":
        """Settings from a Serve config file's ``args`` (unknown keys refused by name)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ServeError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        missing = [name for name in ("checkpoint", "index") if not args.get(name)]
        if missing:
            raise ServeError(f"serve settings need {missing}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in args.items():
            kinds = [t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None)]
            if kinds[0] is bool and not isinstance(value, bool):
                raise ServeError(f"serve setting {name} must be true or false, got {value!r}")
            try:
                values[name] = None if value is None else kinds[0](value)
            except (TypeError, ValueError):
                raise ServeError(f"serve setting {name} must be a {kinds[0].__name__}, got {value!r}") from None
        return cls(**values)


# --------------------------------------------------------------------------------------------- the encoder


@dataclass
class Query:
    """One request as the encoder receives it: a decoded view or pseudo-words, the modifier text, and k."""

    view: np.ndarray | None  # (S, S, 3) uint8, the student's view of the uploaded image
    words: np.ndarray | None  # (M, w) float32, pseudo-words computed by the client (an exported encoder)
    text: str  # "" for image-only retrieval
    k: int  # gallery images to return


@serve.deployment(max_ongoing_requests=64)
class QueryEncoderDeployment:
    """A checkpoint's student and its teacher's text tower, batching concurrent requests, and the search of each
    batch's composed queries in every index shard.

    Args:
        checkpoint: checkpoint or run folder, any fsspec URI; a remote one is copied where this replica runs.
        teacher: the checkpoint's ``teacher`` config section (name, pretrained, cache_dir).
        shards: one handle per index shard.
        max_batch, batch_wait_ms: the batching of :meth:`search`.
    """

    def __init__(
        self,
        checkpoint: str,
        teacher: dict,
        shards: list[DeploymentHandle],
        max_batch: int,
        batch_wait_ms: float,
        threads: int = 1,
    ):
        import torch

        from isa.build import build_teacher
        from isa.checkpoint import find_checkpoint
        from isa.config import TeacherConfig
        from isa.query import QueryEncoder
        from pipelines.eval import local_copy

        torch.set_num_threads(threads)
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        model = build_teacher(TeacherConfig(**teacher), self.device)
        with tempfile.TemporaryDirectory(prefix="isa-serve-") as copies:  # a remote checkpoint's copy, once read
            path = find_checkpoint(local_copy(checkpoint, copies))
            self.encoder = QueryEncoder.from_checkpoint(str(path), model, self.device)
        self.shards = shards
        self.search.set_max_batch_size(max_batch)
        self.search.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        size = self.encoder.config.student.image_size
        out = self.encoder.sentences(np.zeros((1, size, size, 3), np.uint8))  # warm-up and the sentence's shape
        self.words_shape = tuple(out.sentence.shape[1:])  # (M, w)
        self.attention_shape = tuple(out.attention.shape[1:]) if out.attention is not None else None  # (M, h, w)

    def info(self) -> dict:
        """What the ingress checks requests against."""
        return {
            "name": self.encoder.name,
            "device": self.device,
            "pseudo_words": list(self.words_shape),
            "attention": list(self.attention_shape) if self.attention_shape else None,
            "image_size": self.encoder.config.student.image_size,
        }

    # two batches at a time: one is encoded while the shards search the other
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def search(self, queries: list[Query]) -> list[dict]:
        """Each query's best hits: ``{"hits": [Hit, ...], "attention": (M, h, w) | None}``, or ``{"error":
        message}`` for a query that cannot be composed (it fails alone). One search per shard for the batch."""
        from pipelines.index.store import merge_hits

        encoded = await asyncio.to_thread(self._encode, queries)
        rows = [i for i, e in enumerate(encoded) if "embedding" in e]
        if rows:
            embeddings = np.stack([encoded[i].pop("embedding") for i in rows])  # (b, D)
            k = max(queries[i].k for i in rows)
            per_shard = await asyncio.gather(*(s.search.remote(embeddings, k) for s in self.shards))
            for i, hits in zip(rows, merge_hits(per_shard, k)):
                encoded[i]["hits"] = hits[: queries[i].k]
        return encoded

    def _encode(self, queries: Sequence[Query]) -> list[dict]:
        import torch

        from isa.errors import IsaError

        count = len(queries)
        sentences: list[torch.Tensor | None] = [None] * count  # (M, w) each
        attention: list[np.ndarray | None] = [None] * count
        uploads = [i for i, q in enumerate(queries) if q.view is not None]
        if uploads:
            out = self.encoder.sentences(np.stack([queries[i].view for i in uploads]))  # (b, M, w), (b, M, h, w)
            maps = out.attention.float().cpu().numpy() if out.attention is not None else None
            for row, i in enumerate(uploads):
                sentences[i] = out.sentence[row]
                attention[i] = maps[row] if maps is not None else None
        for i, query in enumerate(queries):
            if query.words is not None:
                sentences[i] = torch.from_numpy(query.words).to(self.device)
        results: list[dict] = [{} for _ in range(count)]
        with_text = [i for i, q in enumerate(queries) if q.text]
        image_only = [i for i, q in enumerate(queries) if not q.text]
        groups = ((with_text, self._compose), (image_only, self._image_only))
        for rows, fn in groups:
            if not rows:
                continue
            try:
                embedded = fn([sentences[i] for i in rows], [queries[i].text for i in rows])  # (b, D)
                for row, i in enumerate(rows):
                    results[i] = {"embedding": embedded[row]}
            except IsaError:  # one query's text cannot be composed: each on its own, so only it fails
                for i in rows:
                    try:
                        results[i] = {"embedding": fn([sentences[i]], [queries[i].text])[0]}
                    except IsaError as error:
                        results[i] = {"error": str(error)}
        for i in range(count):
            if "embedding" in results[i]:
                results[i]["attention"] = attention[i]
        return results

    def _compose(self, sentences: list, texts: list[str]) -> np.ndarray:
        import torch

        return self.encoder.compose(torch.stack(sentences), [(t,) for t in texts]).float().cpu().numpy()

    def _image_only(self, sentences: list, texts: list[str]) -> np.ndarray:
        import torch

        return self.encoder.image_only(torch.stack(sentences)).float().cpu().numpy()


# ------------------------------------------------------------------------------------------ index shards


@serve.deployment(max_ongoing_requests=64)
class IndexShardDeployment:
    """One shard of an ``isa index`` folder, searched with a batch of composed queries per call."""

    def __init__(self, index: str, shard: int, threads: int):
        from pipelines.index.store import IndexShard

        self.shard = IndexShard.load(index, shard, threads=threads)

    async def search(self, queries: np.ndarray, k: int) -> list[list]:
        """The best ``k`` hits of each of the (B, D) float32 queries: [[Hit, ...]] * B."""
        return await asyncio.to_thread(self.shard.hits, queries.astype(np.float32, copy=False), k)

    def image_uri(self, image_id: str) -> str | None:
        """The URI of a gallery image of this shard, None when the shard does not hold it."""
        return self.shard.image_uri(image_id)

    def first_ids(self, count: int) -> list[str]:
        return list(self.shard.ids[:count])


# ------------------------------------------------------------------------------------------------ ingress


api = FastAPI(title="isa serve", description="composed image retrieval: an image, a change in words, the gallery")


class _Thumbnails:
    """A small LRU cache of JPEG thumbnails: (id, size) -> bytes."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, key: tuple[str, int]) -> bytes | None:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key: tuple[str, int], data: bytes) -> None:
        self.items[key] = data
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[bytes, str | None]]:
    """A ``multipart/form-data`` body as ``{field: (bytes, filename or None)}`` (RFC 7578).

    Raises:
        HTTPException: 400 when the body is not well-formed multipart.
    """
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise HTTPException(400, "multipart/form-data without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise HTTPException(400, "malformed multipart/form-data body: no closing boundary")
    fields: dict[str, tuple[bytes, str | None]] = {}
    for chunk in chunks[1:-1]:
        head, found, content = chunk.partition(b"\r\n\r\n")
        if not found:
            raise HTTPException(400, "malformed multipart/form-data body: a part without headers")
        part = email.message.Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            filename = part.get_param("filename", header="content-disposition")
            fields[name] = (content, filename if isinstance(filename, str) else None)
    return fields


def _results(hits: Sequence) -> list[dict]:
    return [{"id": h.id, "uri": h.uri, "score": float(h.score)} for h in hits]


def _thumbnail(uri: str, side: int, max_pixels: int) -> bytes:
    import fsspec
    from PIL import Image

    from isa.images import decode_image

    with fsspec.open(uri, "rb") as handle:
        image = decode_image(handle.read(), max_pixels)
    image.thumbnail((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class SearchIngress:
    """The HTTP API (docs/serve.md) and the search page."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        shards: list[DeploymentHandle],
        settings: dict,
        config: dict,
        index_manifest: dict,
    ):
        from isa.config import from_dict

        self.encoder = encoder
        self.shards = shards
        self.settings = ServeSettings(**settings)
        self.config = from_dict(config)
        self.index_manifest = index_manifest
        self.max_bytes = int(self.settings.max_upload_mb * MiB)
        self.thumbnails = _Thumbnails()
        self._info: dict | None = None
        page = importlib.resources.files("pipelines.serve") / "page"
        self.page = {name: (page / name).read_text() for name in ["index.html", *PAGE_FILES]}

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.encoder.info.remote()
        return self._info

    # ------------------------------------------------------------------------------------------ pages

    @api.get("/", response_class=HTMLResponse)
    async def page_index(self, request: Request) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        return HTMLResponse(self.page["index.html"].replace("{{BASE}}", base))

    @api.get("/app.js")
    async def page_script(self) -> Response:
        return Response(self.page["app.js"], media_type=PAGE_FILES["app.js"])

    @api.get("/style.css")
    async def page_style(self) -> Response:
        return Response(self.page["style.css"], media_type=PAGE_FILES["style.css"])

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self.info()
        return {
            "status": "ok",
            "encoder": info["name"],
            "device": info["device"],
            "pseudo_words": info["pseudo_words"],
            "index": {
                "kind": self.index_manifest.get("kind"),
                "count": self.index_manifest.get("count"),
                "shards": len(self.shards),
            },
            "limits": {"max_k": self.settings.max_k, "max_upload_mb": self.settings.max_upload_mb},
        }

    @api.get("/gallery")
    async def gallery(self, n: int = 12) -> dict:
        """Some gallery ids (the first of each shard in turn), for the page's clickable query examples."""
        n = max(0, min(n, 64))
        per_shard = await asyncio.gather(*(s.first_ids.remote(n) for s in self.shards))
        ids = [i for group in zip(*per_shard) for i in group] if per_shard else []
        return {"ids": ids[:n]}

    @api.get("/images/{image_id}")
    async def image(self, image_id: str, size: int | None = None) -> Response:
        """A JPEG thumbnail (longest side ``size``) of a gallery image, read from its URI."""
        side = self.settings.thumbnail if size is None else size
        if not 16 <= side <= 1024:
            raise HTTPException(400, f"size must be between 16 and 1024, got {side}")
        key = (image_id, side)
        data = self.thumbnails.get(key)
        if data is None:
            found = [u for u in await asyncio.gather(*(s.image_uri.remote(image_id) for s in self.shards)) if u]
            if not found:
                raise HTTPException(404, f"no gallery image with id {image_id!r} in the index")
            try:
                data = await asyncio.to_thread(_thumbnail, found[0], side, self.config.cache.max_image_pixels)
            except (OSError, ValueError) as error:
                raise HTTPException(502, f"gallery image {image_id} at {found[0]} cannot be read: {error}") from None
            self.thumbnails.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    # ----------------------------------------------------------------------------------------- search

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed the limit."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise HTTPException(413, self._too_large(int(declared)))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_bytes:
                raise HTTPException(413, self._too_large(len(body), at_least=True))
        return bytes(body)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        measured = f"{'over ' if at_least else ''}{size / MiB:.1f} MiB"
        limit = self.settings.max_upload_mb
        return f"request of {measured} exceeds the upload limit of {limit:g} MiB (--max-upload-mb)"

    def _k(self, value: Any) -> int:
        if value is None or value == "":
            return min(self.settings.default_k, self.settings.max_k)
        try:
            k = int(value)
            if isinstance(value, float) and k != value or isinstance(value, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise HTTPException(400, f"k must be an integer, got {value!r}") from None
        if not 1 <= k <= self.settings.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.settings.max_k} (--max-k), got {k}")
        return k

    @staticmethod
    def _text(value: Any) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise HTTPException(400, f"text must be a string, got {type(value).__name__}")
        return value.strip()

    async def _words(self, value: Any) -> np.ndarray:
        shape = tuple((await self.info())["pseudo_words"])  # (M, w)
        try:
            words = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise HTTPException(400, f"pseudo_words must be numbers of shape {list(shape)} (M rows of w)") from None
        if words.shape != shape:
            raise HTTPException(
                400, f"pseudo_words must have shape {list(shape)} (M rows of w numbers), got {list(words.shape)}"
            )
        if not np.isfinite(words).all():
            raise HTTPException(400, "pseudo_words must be finite numbers (no NaN or infinity)")
        return words

    def _view(self, data: bytes) -> np.ndarray:
        from isa.images import ImageRejected
        from isa.query import student_views

        try:
            return student_views([data], self.config)[0]  # (S, S, 3) uint8
        except ImageRejected as error:
            raise HTTPException(400, f"the uploaded file is not a usable image: {error}") from None

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        """An uploaded image (multipart: image, text, k) or client pseudo-words (JSON) -> the gallery's best k."""
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media not in ("multipart/form-data", "application/json"):
            raise HTTPException(
                415, "send multipart/form-data (image, text, k) or application/json (pseudo_words, text, k)"
            )
        body = await self._body(request)
        if media == "application/json":
            try:
                payload = json.loads(body)
            except ValueError as error:
                raise HTTPException(400, f"the body is not valid JSON: {error}") from None
            if not isinstance(payload, dict):
                raise HTTPException(400, "the JSON body must be an object with pseudo_words, text and k")
            if payload.get("pseudo_words") is None:
                raise HTTPException(400, "no query image: send pseudo_words (JSON) or upload an image (multipart)")
            k, text = self._k(payload.get("k")), self._text(payload.get("text"))
            query = Query(None, await self._words(payload["pseudo_words"]), text, k)
        else:
            fields = parse_multipart(body, content_type)
            k = self._k(fields["k"][0].decode("utf-8", "replace").strip() if "k" in fields else None)
            text = self._text(fields["text"][0].decode("utf-8", "replace") if "text" in fields else None)
            if "image" not in fields or not fields["image"][0]:
                raise HTTPException(400, "no query image: upload an image (field 'image') or send pseudo_words")
            query = Query(await asyncio.to_thread(self._view, fields["image"][0]), None, text, k)
        found = await self.encoder.search.remote(query)
        if "error" in found:
            raise HTTPException(400, f"the query cannot be composed: {found['error']}")
        document: dict[str, Any] = {"results": _results(found["hits"])}
        if query.view is not None and found.get("attention") is not None:
            document["attention"] = np.round(found["attention"], 5).tolist()  # (M, h, w)
        return JSONResponse(document)


# ------------------------------------------------------------------------------------------ the builder


def logging_config(settings: ServeSettings) -> dict:
    """Serve's logging of every replica: per-request access lines only when asked for."""
    return {"log_level": "INFO" if settings.access_log else "WARNING", "enable_access_log": settings.access_log}


def replica_options(settings: ServeSettings, gpus: float = 0, cpus: float | None = None) -> dict:
    """Ray actor options of a replica: its CPUs (``num_cpus`` unless given) and GPUs."""
    options: dict[str, Any] = {"num_cpus": settings.num_cpus if cpus is None else cpus}
    if gpus:
        options["num_gpus"] = gpus
    return options


def encoder_gpus(settings: ServeSettings) -> float:
    """GPUs per encoder replica: the setting, else 1 when the connected cluster has a GPU now."""
    if settings.encoder_gpus is not None:
        return settings.encoder_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(settings: ServeSettings, prepared: Any = None) -> Application:
    """The application: one encoder deployment, one deployment per index shard, the ingress.

    Args:
        prepared: what :func:`pipelines.serve.check` returned for ``settings`` (checked again when None).
    """
    from pipelines.serve import check

    prepared = prepared or check(settings, check_port_free=False)
    threads = max(1, math.floor(settings.num_cpus))
    cpus = settings.encoder_cpus
    logs = logging_config(settings)
    shards = [
        IndexShardDeployment.options(
            name=f"IndexShard{shard}",
            ray_actor_options=replica_options(settings),
            max_ongoing_requests=max(64, 4 * settings.max_batch),
            logging_config=logs,
        ).bind(settings.index, shard, threads)
        for shard in range(len(prepared.index_manifest["shards"]))
    ]
    encoder = QueryEncoderDeployment.options(
        num_replicas=settings.encoder_replicas,
        ray_actor_options=replica_options(settings, encoder_gpus(settings), cpus),
        max_ongoing_requests=max(64, 4 * settings.max_batch),
        logging_config=logs,
    ).bind(
        settings.checkpoint,
        prepared.teacher_config,
        shards,
        settings.max_batch,
        settings.batch_wait_ms,
        max(1, int(cpus)),
    )
    ingress = SearchIngress.options(ray_actor_options=replica_options(settings), logging_config=logs)
    return ingress.bind(encoder, shards, dataclasses.asdict(settings), prepared.config, prepared.index_manifest)


def app_builder(args: dict) -> Application:
    """For ``serve deploy`` / ``serve run pipelines.serve.app:app_builder checkpoint=URI index=URI``: the
    application of :class:`ServeSettings` named by ``args`` (its fields), checked first."""
    return build_app(ServeSettings.from_args(args))
