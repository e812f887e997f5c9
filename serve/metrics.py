"""The server's Prometheus metrics (prometheus_client; one registry per server, so several can live in a process)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

from moevl.serve.scheduler import Hooks

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics(Hooks):
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model = model_name
        lbl = ["model"]
        self.requests = Counter("moevl_requests", "Chat completion requests by HTTP status (or 'cancelled': the "
                                "client went away)", lbl + ["status"], registry=r)
        self.aborted = Counter("moevl_requests_aborted", "Requests the scheduler dropped before they finished "
                               "(their client went away)", lbl, registry=r)
        self.ttft = Histogram("moevl_time_to_first_token_seconds", "From arrival to the first generated token",
                              lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("moevl_time_per_output_token_seconds", "Mean time per generated token after the "
                              "first, per request", lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("moevl_e2e_request_latency_seconds", "From arrival to the last token", lbl,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("moevl_num_requests_waiting", "Requests in the queue (not yet prefilled)", lbl,
                             registry=r)
        self.running_now = Gauge("moevl_num_requests_running", "Requests in the running decode batch", lbl,
                                 registry=r)
        self.batch = Histogram("moevl_decode_batch_size", "Running requests per decode step", lbl,
                               buckets=BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moevl_prompt_tokens", "Prompt tokens prefilled (image tokens included)", lbl,
                                     registry=r)
        self.generation_tokens = Counter("moevl_generation_tokens", "Tokens generated", lbl, registry=r)
        self.experts = Counter("moevl_expert_selections", "Expert selections per router: Awaker, one per request "
                               "and router (its routed task expert); MoE-LLaVA, one per token slot (top-2: two per "
                               "token)", lbl + ["layer", "router", "expert"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, status) -> None:
        self.requests.labels(self.model, str(status)).inc()

    # -- scheduler hooks (called from the scheduler thread)
    def queue_depth(self, n: int) -> None:
        self.waiting.labels(self.model).set(n)

    def running(self, n: int) -> None:
        self.running_now.labels(self.model).set(n)

    def step(self, batch_size: int) -> None:
        self.batch.labels(self.model).observe(batch_size)

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model).observe(seconds)

    def finished(self, req, reason: str, routing: list) -> None:
        if reason == "cancelled":
            self.aborted.labels(self.model).inc()
            return
        now = time.perf_counter()
        m = self.model
        n = len(req.token_ids)
        self.prompt_tokens.labels(m).inc(req.prompt_tokens)
        self.generation_tokens.labels(m).inc(n)
        self.e2e.labels(m).observe(now - req.created)
        if req.first_token_at is not None and n > 1:
            self.tpot.labels(m).observe((now - req.first_token_at) / (n - 1))
        for d in routing:
            counts = getattr(d, "counts", None)
            if counts is not None:  # per-token routing: token slots per expert
                for e, c in enumerate(counts[0]):
                    if c:
                        self.experts.labels(m, str(d.layer), d.router, str(e)).inc(c)
            else:
                self.experts.labels(m, str(d.layer), d.router, str(d.expert[0])).inc()
