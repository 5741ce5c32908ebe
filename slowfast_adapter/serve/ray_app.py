"""The OpenAI-compatible app on Ray Serve: `slowfast-adapter serve --ray --replicas N`.

Two deployments:

- `SlowFastReplica` (N replicas): each loads its own `Engine` (model, processor, encode cache) and runs the very
  app of the one-process server (`create_app`) on the requests the router forwards (`forward`: one ASGI call,
  streamed back through a Ray generator). Its `submit` hook queues prepared jobs into a `@serve.batch` method that
  runs them with `Engine.run_batch` in a worker thread: compatible requests that arrive together become one
  left-padded `generate`, exactly as in the one-process server's worker, and the replica's encode cache serves its
  repeats. (Ray Serve allows one FastAPI ingress per application, and the router must see requests first.)
- `VideoRouter` (the HTTP ingress, `@serve.ingress` with an app built on its replica; no CPU reserved): reads the
  request body, computes a routing key from the request's video URLs (`video_key`) and forwards the request to a
  replica with `handle.options(multiplexed_model_id=key)`. `VideoAffinityRouter` (Ray Serve's pluggable request
  router) picks the replica: the one this key went to before (a new key: the replica holding the fewest keys), else
  a replica that advertises the key (each replica registers the keys it served through `@serve.multiplexed`), else
  any; a replica at its `max_ongoing_requests` is passed over. So every question about a video, including questions
  that arrive together, reaches the replica that encoded it while that replica has room. Requests without video go
  to the least loaded replica. `route_by_video=False`: Ray's default router and no keys (for comparison).

Replies carry `x-slowfast-replica` (which replica answered) and, for non-streaming answers, `x-slowfast-batch`
(requests in the batch that ran it) and `x-slowfast-cache` (`hit` when its videos were already encoded there).

Ray is imported only here, so the one-process server does not need it.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import re
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from ..inference.engine import ChatJob, Engine
from .app import create_app

APP_NAME = "slowfast-adapter"
BATCH_WAIT_S = 0.01  # how long a replica waits for more requests to join a batch
VIDEOS_PER_REPLICA = 256  # routing keys a replica advertises (least recently used dropped first)
HEADER_REPLICA, HEADER_BATCH, HEADER_CACHE = "x-slowfast-replica", "x-slowfast-batch", "x-slowfast-cache"
REPLICA_KEY = "@replica:"  # a routing key that names a replica by its rank (the router's /metrics asks each one)


class ClusterTooSmall(ValueError):
    """The local Ray cluster has fewer CPUs than the replicas ask for."""


def video_key(body: bytes) -> str:
    """The routing key of a chat request: a digest of its `video_url` URLs in order ('' when it has none or the body
    is not a chat request; the replica then answers it, errors included)."""
    try:
        messages = json.loads(body).get("messages", [])
        urls = [
            str(part["video_url"]["url"] if isinstance(part["video_url"], dict) else part["video_url"])
            for message in messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "video_url" and part.get("video_url")
        ]
    except (ValueError, AttributeError, KeyError, TypeError):
        return ""
    if not urls:
        return ""
    return hashlib.blake2b("\n".join(urls).encode(), digest_size=12).hexdigest()


class VideoAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's replica choice for `SlowFastReplica`: a request keyed by its videos (`multiplexed_model_id`) goes
    first to the replica this router sent that key to before, then to replicas that advertise the key (they encoded
    it), then to any other; a new key is given to the replica holding the fewest keys, and remembered at once, so
    questions about a new video that arrive together also meet on one replica (Ray's own multiplexing only learns a
    key once a replica has loaded it). A full replica (at `max_ongoing_requests`) is passed over for the next rank.
    Requests without a key may go to any replica (the least loaded)."""

    def initialize_state(self, max_keys: int = 100_000, **kwargs: Any) -> None:
        self.homes: OrderedDict[str, str] = OrderedDict()  # key -> replica unique id, least recently used first
        self.max_keys = max_keys

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key or not candidate_replicas:
            return [candidate_replicas]
        if key.startswith(REPLICA_KEY):  # "@replica:i": the i-th replica by id (the router's /metrics)
            ordered = sorted(candidate_replicas, key=lambda replica: replica.replica_id.unique_id)
            return [[ordered[int(key[len(REPLICA_KEY) :]) % len(ordered)]]]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        home = self.homes.get(key)
        if home not in by_id:
            held = Counter(self.homes.values())
            home = min(by_id, key=lambda unique_id: (held[unique_id], len(by_id[unique_id].multiplexed_model_ids)))
            self.homes[key] = home
            while len(self.homes) > self.max_keys:
                self.homes.popitem(last=False)
        self.homes.move_to_end(key)
        holders = [r for r in candidate_replicas if key in r.multiplexed_model_ids and r is not by_id[home]]
        rest = [r for r in candidate_replicas if r is not by_id[home] and r not in holders]
        return [[by_id[home]], holders, rest]


@dataclass
class _Exchange:
    """The jobs one forwarded request submitted (the replica's submit hook learns of them through a context
    variable set for the request's task)."""

    jobs: list[ChatJob] = field(default_factory=list)


@serve.deployment
class SlowFastReplica:
    """One `Engine` and the one-process server's app; prepared jobs are batched with `@serve.batch`."""

    def __init__(self, load: dict[str, Any], threads: int = 1, batch_wait_s: float = BATCH_WAIT_S) -> None:
        torch.set_num_threads(threads)
        self.engine = Engine.load(**load)
        self._run_jobs.set_max_batch_size(max(1, self.engine.settings.max_batch_size))
        self._run_jobs.set_batch_wait_timeout_s(batch_wait_s)
        self._tasks: set[asyncio.Task] = set()
        self._batch_sizes: dict[str, int] = {}  # job id -> requests in the batch that ran it
        # the forwarded request being served (made here: the class is pickled by value, a ContextVar cannot be)
        self._exchange: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar("exchange", default=None)
        self.replica = serve.get_replica_context().replica_tag
        self.http_app = create_app(self.engine, submit=self.submit, title="slowfast-adapter (Ray Serve replica)")

    def submit(self, job: ChatJob) -> None:
        """`create_app`'s submit hook: queue the prepared job for the next batch (returns at once)."""
        exchange = self._exchange.get()
        if exchange is not None:
            exchange.jobs.append(job)
        task = asyncio.ensure_future(self._run_jobs(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _run_jobs(self, jobs: list[ChatJob]) -> list[None]:
        """Run one batch of prepared jobs in a worker thread; each job is finished (result or error) after it."""
        for job in jobs:
            self._batch_sizes[job.id] = len(jobs)
        try:
            await asyncio.to_thread(self.engine.run_batch, jobs)
        except Exception as err:  # run_batch finishes its jobs; this only guards against a bug in it
            for job in jobs:
                if not job.done.is_set():
                    job.finish(error=err)
        return [None] * len(jobs)

    @serve.multiplexed(max_num_models_per_replica=VIDEOS_PER_REPLICA)
    async def _claim(self, key: str) -> str:
        """Advertise `key` (a request's videos) as served here, so Ray Serve routes its repeats to this replica."""
        return key

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator:
        """Run one HTTP request through the app: yields ("start", status, headers), then body chunks (bytes).
        Cancelling this generator (the client went away) disconnects the request, which cancels its job."""
        key = serve.get_multiplexed_model_id()
        if key and not key.startswith(REPLICA_KEY):
            await self._claim(key)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": [(bytes(k), bytes(v)) for k, v in headers], "server": ("ray", 0),
                 "client": ("127.0.0.1", 0)}  # fmt: skip
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        received = False

        async def receive() -> dict:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        exchange = _Exchange()
        context = contextvars.copy_context()
        context.run(self._exchange.set, exchange)
        task = asyncio.get_running_loop().create_task(self.http_app(scope, receive, messages.put), context=context)
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield ("start", message["status"], [*message.get("headers", []), *self._headers(exchange)])
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
            task.result()  # re-raise what the app raised
        finally:
            gone.set()
            for job in exchange.jobs:
                self._batch_sizes.pop(job.id, None)
                if not job.done.is_set():
                    job.cancelled.set()
            if not task.done():
                task.cancel()

    def _headers(self, exchange: _Exchange) -> list[tuple[bytes, bytes]]:
        headers = [(HEADER_REPLICA.encode(), self.replica.encode())]
        finished = [job for job in exchange.jobs if job.done.is_set()]
        if finished and finished[-1].result is not None:
            job = finished[-1]
            headers.append((HEADER_BATCH.encode(), str(self._batch_sizes.get(job.id, 1)).encode()))
            headers.append((HEADER_CACHE.encode(), b"hit" if job.result.cache_hit else b"miss"))
        return headers


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class VideoRouter:
    """The HTTP entry point: forwards every request to a replica, keyed by its videos (see the module docstring)."""

    def __init__(self, replicas: Any, route_by_video: bool = True, num_replicas: int = 1) -> None:
        self.replicas = replicas
        self.route_by_video = route_by_video
        self.num_replicas = num_replicas

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The router's app (built on its replica, after `__init__`)."""
        return router_app(self.replicas, self.route_by_video, self.num_replicas)


def router_app(replicas: Any, route_by_video: bool, num_replicas: int = 1) -> FastAPI:
    """One catch-all route that forwards each request to a replica (keyed by its videos) and relays the replica's
    answer as it comes; with video routing, `GET /metrics` gathers every replica's counters (`merge_metrics`).
    (A module-level function: the deployment class is pickled by value, and FastAPI must resolve this module's
    annotations.)"""
    app = FastAPI(title="slowfast-adapter (Ray Serve)")

    if route_by_video:  # the router can name replicas (`REPLICA_KEY`); Ray's default router cannot

        @app.get("/metrics")
        async def metrics() -> Response:
            texts = {}
            for rank in range(num_replicas):  # a replica met twice (one is down) is kept once
                handle = replicas.options(stream=True, multiplexed_model_id=f"{REPLICA_KEY}{rank}")
                reply = handle.forward.remote("GET", "/metrics", b"", [], b"")
                _, status, headers = await reply.__anext__()
                body = b"".join([chunk async for chunk in reply])
                if status == 200:
                    texts[dict(headers).get(HEADER_REPLICA.encode(), b"?").decode()] = body.decode()
            return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def proxy(request: Request) -> Response:
        body = await request.body()
        key = video_key(body) if route_by_video and request.method == "POST" else ""
        handle = replicas.options(stream=True, **({"multiplexed_model_id": key} if key else {}))
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")]
        headers.append((b"content-length", str(len(body)).encode()))
        reply = handle.forward.remote(request.method, request.url.path, request.url.query.encode(), headers, body)
        try:
            _, status, response_headers = await reply.__anext__()
        except BaseException:
            reply.cancel()
            raise
        return StreamingResponse(_relay(reply), status_code=status, headers=_response_headers(response_headers))

    return app


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (.+)$")


def merge_metrics(texts: dict[str, str]) -> str:
    """Replicas' Prometheus texts (replica tag -> text) as one: every sample gains a `replica` label, each metric's
    HELP and TYPE are written once, its samples from every replica after them (`sum without (replica)` adds
    them up)."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        label = 'replica="{}"'.format(replica.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for line in text.splitlines():
            if line.startswith("# "):
                name = line.split(" ", 3)[2]
                if line not in headers.setdefault(name, []):
                    headers[name].append(line)
            elif match := _SAMPLE.match(line):
                name, labels, value = match.groups()
                samples.setdefault(name, []).append(f"{name}{{{label}{',' + labels if labels else ''}}} {value}")
    lines = [line for name in headers | samples for line in (*headers.get(name, []), *samples.get(name, []))]
    return "\n".join(lines) + "\n"


async def _relay(reply: Any) -> AsyncIterator[bytes]:
    """The replica's body chunks; cancels the replica's request when the client goes away."""
    finished = False
    try:
        async for chunk in reply:
            yield chunk
        finished = True
    finally:
        if not finished:
            reply.cancel()


def _response_headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    skip = {"content-length", "transfer-encoding"}  # the relay streams; the server sets these itself
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw if k.decode("latin-1").lower() not in skip}


def build(
    load: dict[str, Any],
    *,
    replicas: int = 2,
    cpus_per_replica: float = 1.0,
    route_by_video: bool = True,
    batch_wait_s: float = BATCH_WAIT_S,
    max_ongoing_requests: int | None = None,
) -> Any:
    """The Ray Serve application: `VideoRouter` in front of `replicas` `SlowFastReplica`s, each loading
    `Engine.load(**load)` with `cpus_per_replica` CPUs (and as many torch threads); a replica waits up to
    `batch_wait_s` for requests to join a batch."""
    batch = load["settings"].max_batch_size if load.get("settings") else 8
    engine = SlowFastReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=max_ongoing_requests or max(16, 4 * batch),
        **(
            {"request_router_config": RequestRouterConfig(request_router_class=VideoAffinityRouter)}
            if route_by_video
            else {}
        ),
    ).bind(load, max(1, round(cpus_per_replica)), batch_wait_s)
    return VideoRouter.bind(engine, route_by_video, replicas)


def start(
    load: dict[str, Any],
    *,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_replica: float | None = None,
    route_by_video: bool = True,
    batch_wait_s: float = BATCH_WAIT_S,
) -> None:
    """Start a local Ray cluster (`num_cpus`: default all cores) or join one (`address`), deploy `build(...)` on
    http://host:port and return once every replica is up. Call `shutdown()` when done."""
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus_per_replica is None:
        cpus_per_replica = max(1.0, float(int(cpus) // replicas))
    if not address and replicas * cpus_per_replica > cpus:  # a joined cluster may add nodes; this one cannot
        raise ClusterTooSmall(
            f"{replicas} replica(s) x {cpus_per_replica:g} CPUs need {replicas * cpus_per_replica:g} CPUs, and the "
            f"local Ray cluster has {cpus:g}: the rest would wait forever to be scheduled. Ask for fewer --replicas "
            f"or fewer --replica-cpus (e.g. {cpus / replicas:.2g}; replicas then share cores)."
        )
    serve.start(http_options={"host": host, "port": port})
    app = build(load, replicas=replicas, cpus_per_replica=cpus_per_replica, route_by_video=route_by_video,
                batch_wait_s=batch_wait_s)  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    wait_for_routing(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", replicas, route_by_video)


def wait_for_routing(url: str, replicas: int, route_by_video: bool, timeout_s: float = 120.0) -> None:
    """Return once the router reaches `replicas` distinct replicas (or after `timeout_s`, saying so).

    `serve.run` returns when every replica runs, but the router learns of them a moment later; a video's first
    question asked before then would stay with the only replica the router knew. With video routing, `/metrics`
    asks the replica of each rank the router knows (`REPLICA_KEY`), so every replica labelling its samples proves
    the router knows them all; without it, Ray's default router sends key-less GETs (/health) to random replicas."""
    import time

    import httpx

    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas and time.monotonic() < deadline:
        try:
            if route_by_video:
                seen |= set(re.findall(r'replica="([^"]+)"', httpx.get(f"{url}/metrics", timeout=10).text))
            else:
                seen.add(httpx.get(f"{url}/health", timeout=10).headers.get(HEADER_REPLICA, ""))
        except httpx.HTTPError:
            pass
        seen.discard("")
        if len(seen) < replicas:
            time.sleep(0.2)
    if len(seen) < replicas:
        print(f"slowfast-adapter serve: the router reached {len(seen)} of {replicas} replicas in {timeout_s:.0f} s; "
              "videos asked about now may all go to those", flush=True)  # fmt: skip


def shutdown(*, joined: bool = False) -> None:
    """Remove the application and disconnect from Ray: a local cluster (started by `start`) is stopped with Ray
    Serve, processes included; on a joined cluster (`address`) only this application is deleted."""
    try:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
