"""Every Prometheus object of the server, in one registry per app (names: ddpm_<noun>_<unit>)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from service.continuous_batcher import EngineObserver, Job

# Sized for real latencies: a 10-step chain on a GPU is ~10 ms, the paper's 1000-step chain on a
# 2-core CPU is minutes.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
ITERATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
OCCUPANCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GENERATION_ROUTES = ("/generate", "/generate/stream")
ROUTES = (*GENERATION_ROUTES, "/schedule", "/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json")  # bounded label values


class Metrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "ddpm_request_duration_seconds", "Time from arrival to answer of POST /generate, by outcome",
            ["outcome"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "ddpm_queue_wait_seconds", "Time from arrival to a request's first denoising iteration", buckets=REQUEST_BUCKETS, registry=r
        )
        self.iteration_duration = Histogram(
            "ddpm_iteration_duration_seconds",
            "One U-Net call plus fused step over the running batch",
            buckets=ITERATION_BUCKETS,
            registry=r,
        )
        self.batch_occupancy = Histogram(
            "ddpm_batch_occupancy", "Samples in the running batch per iteration", buckets=OCCUPANCY_BUCKETS, registry=r
        )
        self.images_generated = Counter("ddpm_images_generated", "Images completed and returned", registry=r)
        self.image_steps = Counter(
            "ddpm_image_steps",
            "U-Net evaluations (image-steps) of completed requests, by sampler: the cost of each",
            ["sampler"],
            registry=r,
        )
        self.requests = Counter(
            "ddpm_requests",
            "Generation requests (POST /generate, /generate/stream) answered, by status code; a stream counts the status "
            "its final event carried (499 when the client left)",
            ["code"],
            registry=r,
        )
        self.http_responses = Counter(
            "ddpm_http_responses", "Every HTTP response, by route (other: unknown paths) and status code", ["route", "code"], registry=r
        )
        self.engine_faults = Counter(
            "ddpm_engine_faults", "Exceptions caught in a stage of the serving path (each fails only the requests it touched)",
            ["stage"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("ddpm_queue_depth", "Images waiting for a slot in the running batch", registry=r)
        self.running_samples = Gauge("ddpm_running_samples", "Samples in the running batch", registry=r)
        self.iterations = Counter("ddpm_iterations", "Denoising iterations run", registry=r)
        self.ready = Gauge("ddpm_ready", "1 when the model is loaded and warmed up and the server is not draining", registry=r)
        self.model_info = Info("ddpm_model", "The model being served", registry=r)

    # --- EngineObserver ---------------------------------------------------------------------------
    def on_iteration(self, batch_size: int, seconds: float) -> None:
        self.iteration_duration.observe(seconds)
        self.batch_occupancy.observe(batch_size)
        self.iterations.inc()

    def on_admitted(self, job: Job) -> None:
        if job.queue_wait is not None:
            self.queue_wait.observe(job.queue_wait)

    def on_job_done(self, job: Job) -> None:
        if job.error is None:
            self.images_generated.inc(job.n)
            self.image_steps.labels(sampler=job.sampler).inc(job.n * job.steps)

    def on_load(self, queue_depth: int, running: int) -> None:
        self.queue_depth.set(queue_depth)
        self.running_samples.set(running)

    def on_fault(self, stage: str, jobs: int) -> None:
        self.engine_faults.labels(stage=stage).inc()

    # --- the HTTP layer ----------------------------------------------------------------------------
    def on_response(self, method: str, path: str, code: int, outcome: str, seconds: float) -> None:
        """Every response, from RequestContextMiddleware (so 400/401/413 floods are visible too)."""
        self.http_responses.labels(route=path if path in ROUTES else "other", code=str(code)).inc()
        if method == "POST" and path in GENERATION_ROUTES:
            self.requests.labels(code=str(code)).inc()
            self.request_duration.labels(outcome=outcome).observe(seconds)
