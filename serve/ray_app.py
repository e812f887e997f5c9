"""The same FastAPI app as a Ray Serve deployment: one replica per device, autoscaled on ongoing requests.

    moevl serve --model awaker-tiny --ray --replicas 2           # a local Ray instance
    ray start --head; moevl serve --model ... --ray --ray-address auto   # an existing cluster

Each replica loads the model in its constructor (Ray routes to it once it is up) and runs its own scheduler
(continuous batching within the replica); Ray's HTTP proxy spreads requests over the replicas. Placement: an NPU
per replica on Ascend hosts (Ray's built-in "NPU" resource; Ray sets ASCEND_RT_VISIBLE_DEVICES for the replica,
so the replica's device is npu:0), a GPU per replica on CUDA (``num_gpus``), one CPU otherwise.
"""
from __future__ import annotations

import dataclasses
import sys

from moevl.serve.app import Server, ServerConfig, create_app

APP_NAME = "moevl"


def placement(device: str, cluster_resources: dict) -> tuple[dict, str, int]:
    """(ray_actor_options, the device string a replica loads on, devices in the cluster) for --device."""
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "npu" if cluster_resources.get("NPU") else "cuda" if cluster_resources.get("GPU") else "cpu"
    if kind == "npu":
        return {"resources": {"NPU": 1}}, "npu", int(cluster_resources.get("NPU", 0))
    if kind == "cuda":
        return {"num_gpus": 1}, "cuda", int(cluster_resources.get("GPU", 0))
    return {"num_cpus": 1}, kind, int(cluster_resources.get("CPU", 1))


def build(cfg: ServerConfig, replicas: int | None, cluster_resources: dict):
    """The Ray Serve application (bound deployment) for ``cfg``."""
    from ray import serve

    actor_options, device, devices = placement(cfg.device, cluster_resources)
    # Ray's router admits at most max_batch + max_queue requests per replica (max_ongoing_requests below). It counts
    # a request as finished when its response ends, and the replica's scheduler frees the row a moment later; a
    # request Ray routes in that moment (or re-routes from a lost replica) must not be turned away with 429 by the
    # replica's own bound, so the replica's queue gets one batch of slack (CI saw that 429 once on 2 cores).
    replica_cfg = dataclasses.replace(cfg, device=device, max_queue=cfg.max_queue + cfg.max_batch)

    @serve.ingress()
    class MoevlReplica:
        def __init__(self, cfg: ServerConfig):
            self.server = Server(cfg)
            self.server.start(background=False)
            if self.server.error:
                raise RuntimeError(f"the model could not be loaded: {self.server.error}")

        def __serve_build_asgi_app__(self):
            return create_app(server=self.server, load=False, close=True)

        def check_health(self):
            if not self.server.ready:
                raise RuntimeError("the scheduler of this replica has stopped")

    options = dict(ray_actor_options=actor_options,
                   max_ongoing_requests=cfg.max_batch + cfg.max_queue,
                   graceful_shutdown_timeout_s=cfg.shutdown_timeout)
    if replicas:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": max(devices, 1),
                                         "target_ongoing_requests": cfg.max_batch}
    return serve.deployment(MoevlReplica, name="MoevlReplica", **options).bind(replica_cfg)


def start(cfg: ServerConfig, replicas: int | None = None, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, blocking: bool = False):
    """Start Ray (or join ``address``), Serve's HTTP proxy on host:port, and the deployment."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = build(cfg, replicas, ray.cluster_resources())
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)


def run_ray(cfg: ServerConfig, replicas: int | None, host: str, port: int, address: str | None) -> int:
    """``moevl serve --ray``: serve until interrupted."""
    from ray import serve

    print(f"moevl serve: {cfg.name} on Ray Serve, http://{host}:{port}/v1 ({replicas or 'autoscaled'} replicas)",
          file=sys.stderr)
    try:
        start(cfg, replicas, host, port, address, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
