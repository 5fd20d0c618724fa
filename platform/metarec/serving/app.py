"""The Ray Serve application: a FastAPI ingress over ``Service``, micro-batched adaptation.

Each replica loads one model (from the MLflow registry or a checkpoint), holds its own
session LRU and feedback-log file, and adapts concurrent requests together: every endpoint
validates its request, awaits ``_run`` (``@serve.batch`` collects the jobs of concurrent
requests into one ``Engine.run``), then shapes its own answer. The engine runs in a worker
thread so the event loop keeps accepting (and batching) requests while torch computes.

Three ways to run it: ``metarec serve`` (below, ``serve_forever``), ``serve run
serve/config.yaml`` and ``serve deploy serve/config.yaml`` (both through ``build_app``).
"""

# No `from __future__ import annotations` here: FastAPI reads these route signatures at
# runtime, and Serve's ingress wrapper cannot resolve string annotations.
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Path as PathParam
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from ray import serve

from metarec import __version__
from metarec.catalog import Catalog, FieldError, require_catalog
from metarec.checkpoint import learner_from_checkpoint, load_checkpoint
from metarec.config import ServeConfig, section_from_dict
from metarec.errors import ConfigError, ModelNotFoundError
from metarec.loop import resolve_device
from metarec.serving.engine import Engine, Job, Result
from metarec.serving.schemas import (
    HARD_MAX_ITEMS,
    FeedbackRequest,
    PredictRequest,
    RecommendRequest,
)
from metarec.serving.service import Service
from metarec.serving.sessions import FeedbackLog, Sessions

__all__ = ["build_app", "load_service", "serve_forever"]

log = logging.getLogger(__name__)
TOKEN_ENV = "METAREC_API_TOKEN"
MAX_BODY_BYTES = 4 << 20
# The page at GET /: files of the package, read once; no CDN, no build step. Its policy lets
# only those files run script: markup that slipped into data would not execute either.
PAGE = {
    name: (Path(__file__).with_name("page") / name).read_bytes()
    for name in ("index.html", "app.js", "style.css", "icon.svg")
}
PAGE_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript",
    "css": "text/css",
    "svg": "image/svg+xml",
}
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
UserId = Annotated[str, PathParam(min_length=1, max_length=128, pattern=r"^[\w.@:-]+$")]


def default_model(work_dir: str | os.PathLike) -> str:
    """``models:/<last trained model>@champion``: serve what was promoted, never by accident
    a candidate nobody looked at."""
    record = Path(work_dir) / "last_run.json"
    if not record.is_file():
        raise ModelNotFoundError(
            f"no --model given and no {record} (written by `metarec train`); pass --model"
        )
    name = json.loads(record.read_text())["model_uri"].removeprefix("models:/")
    return f"models:/{name.split('@')[0].split('/')[0]}@champion"


def resolve_model(settings: ServeConfig) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The model to serve: its URI, registry facts and checkpoint, or a one-line
    ``MetarecError`` (the CLI calls this before starting Serve, so a typo in ``--model``
    is an input error in a second, not replica tracebacks a minute later)."""
    from metarec.registry import describe_model, resolve_checkpoint
    from metarec.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri, settings.work_dir)
    model = settings.model or default_model(settings.work_dir)
    try:
        info = describe_model(model, uri)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(
            f"{e} (promote a version with `metarec promote NAME VERSION`, or serve "
            "models:/NAME@candidate explicitly)"
        ) from e
    return model, info, load_checkpoint(resolve_checkpoint(model, uri))


def load_service(settings: ServeConfig, *, writer: str) -> Service:
    """Load the model and open the feedback log (``writer`` names this process's file)."""
    model, info, ckpt = resolve_model(settings)
    learner = learner_from_checkpoint(ckpt)
    m = learner.model
    catalog = Catalog.from_checkpoint(ckpt, m.item_genres, m.item_year)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    engine = Engine(
        learner,
        steps=settings.steps,
        device=resolve_device(settings.device),
        retrieval=settings.retrieval,
    )
    feedback_dir = Path(settings.feedback_dir or Path(settings.work_dir) / "feedback")
    label = f"{info['name']}/{info['version']}" if info["name"] else model
    cfg = learner.cfg
    return Service(
        engine,
        catalog,
        model_info={
            **info,
            "label": label,
            "algorithm": cfg.algorithm,
            "adapt": cfg.adapt,
            "inner_steps": cfg.inner_steps if settings.steps is None else settings.steps,
            "items": len(catalog),
            "rating_range": list(catalog.rating_range),
            "dataset": catalog.dataset,
            "feedback": catalog.feedback,
            "event_weights": catalog.event_weights,
            "limits": dataclasses.asdict(settings.limits),
        },
        limits=settings.limits,
        sessions=Sessions(
            feedback_dir,
            max_sessions=settings.max_sessions,
            max_ratings=settings.limits.max_ratings,
            index=catalog.index,
            implicit=catalog.feedback == "implicit",
        ),
        feedback=FeedbackLog(feedback_dir, writer),
    )


def _page_file(name: str) -> Response:
    # (above the deployment class: Serve pickles it with the globals defined before it)
    kind = PAGE_TYPES[name.rsplit(".", 1)[1]]
    headers = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"}
    return Response(PAGE[name], media_type=kind, headers=headers)


def _unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    """422 in FastAPI's shape: ``detail[]`` of {loc, msg, type}."""
    return JSONResponse(status_code=422, content={"detail": detail})


# Swagger UI's assets are served from the installed package, not a CDN: /docs works on
# machines and clusters with no internet.
api = FastAPIOffline(
    title="metarec",
    version=__version__,
    description="Per-user adaptation of a meta-learned recommender: send a few ratings, "
    "get personal recommendations. Errors: 422 with `detail[].loc` naming the field.",
)


@api.exception_handler(FieldError)
async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
    return _unprocessable([{"loc": list(exc.loc), "msg": exc.msg, "type": "value_error"}])


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input, which can hold NaN (not valid JSON): that
    # turned a bad request into a 500. Field, message and type are what a client needs.
    return _unprocessable(
        [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    )


class Guard:
    """Bearer token on /v1/* when METAREC_API_TOKEN is set; request bodies bounded.

    A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's
    ``BaseHTTPMiddleware`` wraps every request and response in extra tasks and streams,
    a per-request cost paid before any real work.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        token = os.environ.get(TOKEN_ENV)
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = dict(scope["headers"])  # ASGI: lower-case byte names
        given = headers.get(b"authorization", b"")
        if (
            self.expected
            and scope["path"].startswith("/v1/")
            and not hmac.compare_digest(given, self.expected)
        ):
            return JSONResponse(
                status_code=401,
                content={"detail": "missing or wrong bearer token (Authorization: Bearer ...)"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                status_code=413, content={"detail": f"request body over {MAX_BODY_BYTES} bytes"}
            )
        return None


api.add_middleware(Guard)


K = Annotated[int, Query(ge=1, le=HARD_MAX_ITEMS)]
# Micro-batching defaults (the deployment's user_config; `serve deploy` changes them live).
MAX_BATCH_SIZE = ServeConfig().max_batch_size
BATCH_WAIT_S = ServeConfig().batch_wait_ms / 1000


def _replica_grpc_on_loopback() -> None:
    """On a one-machine Ray (node address 127.0.0.1, ``ray_cluster.local_ray_settings``), bind this
    replica's inter-deployment gRPC server to 127.0.0.1 instead of every interface.

    Serve 2.60 hard-codes ``[::]:0`` for it (``serve/_private/replica.py``) and offers no
    setting; it starts after this constructor, through the module-level helper patched
    here, in this replica's process only. On a multi-node cluster it is left alone: other
    nodes must reach it.
    """
    import ray
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if ray.util.get_node_ip_address() != "127.0.0.1" or getattr(bind, "loopback", False):
        return

    def loopback(server: Any, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


@serve.deployment(
    name="metarec",
    max_ongoing_requests=256,  # >= max_batch_size, or batches never fill
    ray_actor_options={"num_cpus": 1},
    user_config={"max_batch_size": MAX_BATCH_SIZE, "batch_wait_timeout_s": BATCH_WAIT_S},
    # Serve's per-request access log line is a large share of the HTTP path's cost
    # (docs/serving.md, measured with benchmarks/serve_load.py); metrics remain.
    logging_config={"enable_access_log": False},
)
@serve.ingress(api)
class MetarecServer:
    def __init__(self, settings: dict[str, Any]) -> None:
        _replica_grpc_on_loopback()
        ctx = serve.get_replica_context()
        resolved = section_from_dict("serve", settings, where="replica settings")
        self.service = load_service(resolved, writer=ctx.replica_tag)
        # one user's feedback is logged and applied in arrival order, others' concurrently
        self._locks: dict[str, list] = {}  # user -> [lock, requests holding or awaiting it]
        schema = api.openapi()  # built once and cached by FastAPI: add the catalog's examples
        for name, example in self.service.request_examples().items():
            schema["components"]["schemas"][name]["examples"] = [example]

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch size and wait from ``user_config``: changed live, no replica restart."""
        self._run.set_max_batch_size(int(config.get("max_batch_size", MAX_BATCH_SIZE)))
        self._run.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", BATCH_WAIT_S)))

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _run(self, jobs: list[Job]) -> list[Result]:
        # On this loop, not in a worker thread: a thread made the engine and the request
        # handling share the GIL op by op, so requests trickled in and batches stayed tiny.
        # Blocking the user-code loop while the batch computes lets Serve queue the requests
        # that arrive meanwhile (it receives on its own thread), and the next batch takes
        # them all (docs/serving.md has the measured batch sizes).
        return self.service.engine.run(jobs)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/", include_in_schema=False)
    async def page(self) -> Response:
        """A page to try the model as a new user: rate, watch the list adapt, see why."""
        return _page_file("index.html")

    @api.get("/page/{name}", include_in_schema=False)
    async def page_asset(self, name: str) -> Response:
        if name == "index.html" or name not in PAGE:
            return JSONResponse(status_code=404, content={"detail": f"no page file {name!r}"})
        return _page_file(name)

    @api.get("/v1/model")
    async def model(self) -> JSONResponse:
        return JSONResponse({**self.service.model_info, "engine": self.service.engine.stats})

    @api.post("/v1/recommend")
    async def recommend(self, req: RecommendRequest) -> JSONResponse:
        """Top-k items after adapting to the given ratings (none: cold start)."""
        job = self.service.recommend_job(req)
        return JSONResponse(self.service.recommend_response(req, job, await self._run(job)))

    @api.post("/v1/predict")
    async def predict(self, req: PredictRequest) -> JSONResponse:
        """Predicted ratings of the given items after adapting to the given ratings."""
        job = self.service.predict_job(req)
        return JSONResponse(self.service.predict_response(job, await self._run(job)))

    @api.get("/v1/items")
    async def items(
        self,
        q: Annotated[str, Query(min_length=1, max_length=200, examples=["star wars"])],
        n: K = 10,
    ) -> JSONResponse:
        """Search the catalog by title (every word, any case), most rated first."""
        return JSONResponse(self.service.search(q, n))

    @api.get("/v1/onboarding")
    async def onboarding(self, n: K = 10) -> JSONResponse:
        """Items to ask a brand-new user to rate first."""
        return JSONResponse(self.service.onboarding(n))

    @api.post("/v1/users/{user_id}/feedback")
    async def feedback(self, user_id: UserId, req: FeedbackRequest) -> JSONResponse:
        """Append ratings to the user's session (durably), re-adapt, return top-k."""
        events = self.service.feedback_events(user_id, req)
        entry = self._locks.setdefault(user_id, [asyncio.Lock(), 0])
        entry[1] += 1  # requests holding or awaiting this user's lock
        try:
            async with entry[0]:
                # the fsync in a worker thread: the loop keeps accepting and batching
                logged = await asyncio.to_thread(self.service.feedback_log.append, events)
                job, session, version = self.service.apply_feedback(user_id, req, events, logged)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[user_id]
        result = await self._run(job)
        answer = self.service.session_response(user_id, session, version, job, result, req.k)
        return JSONResponse(answer)

    @api.get("/v1/users/{user_id}/recommendations")
    async def recommendations(
        self, user_id: UserId, k: K = 10, exclude_seen: bool = True
    ) -> JSONResponse:
        """Top-k for the session (cached fast weights; a new user gets the cold start)."""
        job, session, version = self.service.session_job(user_id, k, exclude_seen)
        result = await self._run(job)
        answer = self.service.session_response(
            user_id, session, version, job, result, k, exclude_seen
        )
        return JSONResponse(answer)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run/deploy serve/config.yaml``: its ``args:`` are the
    config's ``serve`` section, checked like any config (a typo is an error before anything
    starts). The address is the YAML's ``http_options``; its ``deployments:`` entries, where
    given, override the replicas and batching set here."""
    for key in ("host", "port"):
        if key in (args or {}):
            raise ConfigError(
                f"serve.{key}: got {args[key]!r} in the application's args; expected it in "
                f"the Serve config's http_options.{key} (args cannot move Serve's proxy)"
            )
    return _application(section_from_dict("serve", args or {}, where="serve application args"))


def _application(settings: ServeConfig) -> serve.Application:
    """The deployment as ``settings`` shapes it: replicas, CPUs, micro-batching, access log."""
    options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if os.environ.get(TOKEN_ENV):  # replicas of a joined cluster do not share our env
        options["runtime_env"] = {"env_vars": {TOKEN_ENV: os.environ[TOKEN_ENV]}}
    return MetarecServer.options(
        num_replicas=settings.replicas,
        ray_actor_options=options,
        max_ongoing_requests=max(256, 2 * settings.max_batch_size),
        logging_config={"enable_access_log": settings.access_log},
        user_config={
            "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_ms / 1000,
        },
    ).bind(dataclasses.asdict(settings))


def serve_forever(settings: ServeConfig) -> None:
    """``metarec serve``: start (or join) Ray, run the app on host:port until Ctrl-C."""
    import ray

    from metarec.ray_cluster import connect_ray

    model, _, ckpt = resolve_model(settings)  # fails fast, before Ray starts
    require_catalog(ckpt)
    settings = dataclasses.replace(settings, model=model)
    connect_ray()
    host, port = settings.host, settings.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(_application(settings), name="metarec", route_prefix="/", blocking=False)
    print(f"metarec serving at http://{host}:{port}  (API docs: http://{host}:{port}/docs)")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops it as cleanly as Ctrl-C
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
