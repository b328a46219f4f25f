"""Every Prometheus object of the server, in one registry per app (names: ddpm_<noun>_<unit>)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector

from service.container_memory import memory_limit, memory_working_set
from service.engine.job import Job
from service.engine.observer import EngineObserver

if TYPE_CHECKING:
    import torch

# Sized for real latencies: a 10-step chain on a GPU is ~10 ms, the paper's 1000-step chain on a
# 2-core CPU is minutes.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
ITERATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
OCCUPANCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GENERATION_ROUTES = ("/generate", "/generate/stream", "/v1/images/generations", "/v1/images/edits", "/v1/images/variations")
ROUTES = (
    *GENERATION_ROUTES, "/schedule", "/info", "/v1/models", "/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json",
)  # bounded label values  # fmt: skip


def _or_nan(value: int | None) -> float:
    return float("nan") if value is None else float(value)


class Metrics(EngineObserver):
    """``model`` labels the serving metrics, as vLLM's ``model_name`` and Triton's ``model`` do, so that
    one dashboard can tell the models of a fleet apart (one model per process: the label is constant)."""

    def __init__(self, registry: CollectorRegistry | None = None, model: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        self.model = model
        r = self.registry
        # process_* (resident memory, CPU seconds, open fds, start time) and python_info, as every
        # Python exporter has them: fleet dashboards and alerts expect them beside the service's own
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.request_duration = Histogram(
            "ddpm_request_duration_seconds", "Time from arrival to answer of a generation request, by outcome",
            ["model", "outcome"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "ddpm_queue_wait_seconds", "Time from arrival to a request's first denoising iteration", ["model"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.iteration_duration = Histogram(
            "ddpm_iteration_duration_seconds",
            "One U-Net call plus fused step over the running batch",
            buckets=ITERATION_BUCKETS,
            registry=r,
        )
        self.batch_occupancy = Histogram(
            "ddpm_batch_occupancy", "Samples in the running batch per iteration", buckets=OCCUPANCY_BUCKETS, registry=r
        )
        self.images_generated = Counter("ddpm_images_generated", "Images completed and returned", ["model"], registry=r)
        self.image_steps = Counter(
            "ddpm_image_steps",
            "U-Net evaluations (image-steps) of completed requests, by sampler: the cost of each",
            ["model", "sampler"],
            registry=r,
        )
        self.guided_image_steps = Counter(
            "ddpm_guided_image_steps",
            "Image-steps of completed classifier-free-guided requests: each cost a second (null-label) U-Net row",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "ddpm_requests",
            "Generation requests (POST /generate, /generate/stream) answered, by status code; a stream counts the status "
            "its final event carried (499 when the client left)",
            ["model", "code"],
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
        self.cache_lookups = Counter(
            "ddpm_response_cache_lookups",
            "Response cache lookups of generation requests: hit (answered without a U-Net call), shared (an identical request's "
            "job in flight made its images) or miss",
            ["model", "result"], registry=r,
        )  # fmt: skip
        self.not_modified = Counter(
            "ddpm_response_not_modified",
            "Generation requests answered 304 (If-None-Match matched the answer's ETag)",
            ["model"],
            registry=r,
        )
        self.cache_bytes = Gauge("ddpm_response_cache_bytes", "Memory held by the response cache's images", registry=r)
        for result in ("hit", "shared", "miss"):  # present from the start, at 0
            self.cache_lookups.labels(model=model, result=result)
        self.hot_path_compiled = Gauge(
            "ddpm_hot_path_compiled",
            "1 when batches of this size group (1, 2+) run the compiled graphs; 0 while they run eagerly (compiling in the "
            "background, or compile off or failed)",
            ["batch"],
            registry=r,
        )
        self.compile_fallbacks = Counter(
            "ddpm_compile_fallbacks",
            "U-Net or step calls run eagerly because no compiled graph covered their shape yet (a batch size or step variant "
            "the warm-up did not reach): each one is a compile the serving thread did not do; the compile thread builds it",
            ["path"],
            registry=r,
        )
        self.compiled_batch_sizes = Gauge(
            "ddpm_compiled_batch_sizes",
            "Batch sizes with compiled graphs, per call variant (unet, unet+labels, step, step+x0_prev, step+edit, "
            "step+x0_prev+edit); GET /info's compiled_batches gives the ranges",
            ["variant"],
            registry=r,
        )
        for path in ("unet", "step"):  # present from the start, at 0
            self.compile_fallbacks.labels(path=path)
        # scheduling (issue 37): per priority (bounded by DDPM_MIN_PRIORITY..DDPM_MAX_PRIORITY: at most 21 values by default)
        self.slo = Counter(
            "ddpm_slo_requests",
            "Requests with a deadline answered, by priority and whether the answer came within the deadline (met) or not (missed): "
            "SLO attainment = met / (met + missed)",
            ["model", "priority", "result"],
            registry=r,
        )
        self.goodput = Counter(
            "ddpm_goodput_images",
            "Images delivered in time (within their request's deadline, or with no deadline), by priority: rate() is goodput",
            ["model", "priority"],
            registry=r,
        )
        self.priority_queue_wait = Histogram(
            "ddpm_priority_queue_wait_seconds", "Arrival to a request's first iteration, by priority", ["model", "priority"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.preemptions = Counter(
            "ddpm_preempted_rows",
            "Row-iterations sat out, by priority: a resident row of a worse priority (or less slack) that a U-Net call had no room for",
            ["priority"],
            registry=r,
        )
        self.refusals = Counter(
            "ddpm_refused_requests",
            "Requests refused at arrival by reason: deadline (it could not be met given the work ahead: 503 + Retry-After), "
            "timeout (alone it would take longer than DDPM_REQUEST_TIMEOUT_S: 503 + Retry-After), "
            "accepted_deadlines (beside them it would make an accepted request late by more than an iteration: 503 + "
            "Retry-After), cost (over DDPM_MAX_CALLS_PER_REQUEST: 422), size (more images or calls than the queue or a client's "
            "quota could ever hold: 422), client_quota (over the client's images or calls in "
            "flight: 429)",
            ["reason"],
            registry=r,
        )
        for reason in ("deadline", "timeout", "accepted_deadlines", "cost", "size", "client_quota"):  # present from the start, at 0
            self.refusals.labels(reason=reason)
        self.backlog = Gauge(
            "ddpm_backlog_seconds",
            "Seconds the work held now (resident rows' steps left and waiting images' calls) takes at the call size, at the "
            "measured iteration cost: the metric to scale replicas on (deploy/k8s/hpa.yaml)",
            registry=r,
        )
        self.call_size = Gauge(
            "ddpm_call_size_rows",
            "The most rows one U-Net call takes while more are resident: DDPM_MAX_BATCH, or the size the engine measured the "
            "best rows per second at (fewer where a CPU's full batch is slower per row; DDPM_TUNE_CALL_SIZE)",
            registry=r,
        )
        self.answer_reserve = Gauge(
            "ddpm_answer_reserve_seconds",
            "Of a request's deadline, the time kept for its answer after its images are done: the measured time to encode "
            "an answer, with its spread, plus DDPM_DEADLINE_MARGIN_S",
            registry=r,
        )
        self.tls_expiry = Gauge(
            "ddpm_tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate this replica serves stops being valid (Unix time), by file (DDPM_TLS_CERT_FILE; "
            "absent without TLS): a renewal that never reached the file shows here before clients refuse it",
            ["file"], registry=r,
        )  # fmt: skip
        self.trace_spans = Counter(
            "ddpm_trace_spans",
            "Request spans sent to the collector (DDPM_OTLP_TRACES_ENDPOINT), by result: exported, or dropped (the collector "
            "did not take them after the exporter's retries; the log says when that begins and ends)",
            ["result"], registry=r,
        )  # fmt: skip
        self.open_connections = Gauge(
            "ddpm_http_connections", "Open client connections (DDPM_MAX_CONNECTIONS bounds them; probes and /metrics are exempt)",
            registry=r,
        )  # fmt: skip
        self.connection_deadlines = Counter(
            "ddpm_http_connection_deadlines",
            "Connections closed with 408 because no complete request headers arrived within DDPM_REQUEST_READ_TIMEOUT_S: "
            "idle (nothing received) or headers (an incomplete request)",
            ["reason"],
            registry=r,
        )
        for reason in ("idle", "headers"):
            self.connection_deadlines.labels(reason=reason)
        # the kernel's count, read at each scrape (service/container_memory.py): the alert DdpmMemoryNearLimit
        Gauge("ddpm_memory_limit_bytes", "The replica's cgroup memory limit: past it the kernel kills the process (NaN: none)",
              registry=r).set_function(lambda: _or_nan(memory_limit()))  # fmt: skip
        Gauge("ddpm_memory_working_set_bytes", "The replica's cgroup memory in use that the kernel cannot drop (usage less "
              "inactive file pages; a tmpfs counts), as the kubelet counts it",
              registry=r).set_function(lambda: _or_nan(memory_working_set()))  # fmt: skip

    def watch_cache(self, size_bytes: Callable[[], int]) -> None:
        self.cache_bytes.set_function(lambda: float(size_bytes()))

    def watch_connections(self, open_connections: Callable[[], int]) -> None:
        self.open_connections.set_function(lambda: float(open_connections()))

    def on_spans_exported(self, exported: bool, spans: int) -> None:
        self.trace_spans.labels(result="exported" if exported else "dropped").inc(spans)

    def watch_certificate(self, file: str, expiry: Callable[[], float]) -> None:
        self.tls_expiry.labels(file=file).set_function(expiry)

    def on_connection_deadline(self, reason: str) -> None:
        self.connection_deadlines.labels(reason=reason).inc()

    def watch_gpu(self, device: torch.device) -> None:
        """GPU memory gauges (PyTorch's caching allocator and the device's total), read at each scrape."""
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        label = f"cuda:{index}"
        gauges = {
            "allocated": ("ddpm_gpu_memory_allocated_bytes", "Memory held by tensors (torch.cuda.memory_allocated)",
                          lambda: torch.cuda.memory_allocated(index)),
            "reserved": ("ddpm_gpu_memory_reserved_bytes", "Memory held by PyTorch's caching allocator (torch.cuda.memory_reserved)",
                         lambda: torch.cuda.memory_reserved(index)),
            "peak": ("ddpm_gpu_memory_peak_allocated_bytes", "Peak of memory_allocated since start (torch.cuda.max_memory_allocated)",
                     lambda: torch.cuda.max_memory_allocated(index)),
            "total": ("ddpm_gpu_memory_total_bytes", "The device's memory (torch.cuda.get_device_properties().total_memory)",
                      lambda: torch.cuda.get_device_properties(index).total_memory),
        }  # fmt: skip
        for name, help_text, read in gauges.values():
            Gauge(name, help_text, ["device"], registry=self.registry).labels(device=label).set_function(lambda read=read: float(read()))

    def on_cache_lookup(self, result: str) -> None:
        self.cache_lookups.labels(model=self.model, result=result).inc()

    def on_not_modified(self) -> None:
        self.not_modified.labels(model=self.model).inc()

    # --- EngineObserver ---------------------------------------------------------------------------
    def on_iteration(self, batch_size: int, seconds: float) -> None:
        self.iteration_duration.observe(seconds)
        self.batch_occupancy.observe(batch_size)
        self.iterations.inc()

    def on_admitted(self, job: Job) -> None:
        if job.queue_wait is not None:
            self.queue_wait.labels(model=self.model).observe(job.queue_wait)
            self.priority_queue_wait.labels(model=self.model, priority=str(job.priority)).observe(job.queue_wait)

    def on_job_done(self, job: Job) -> None:
        if job.error is None:
            self.images_generated.labels(model=self.model).inc(job.n)
            self.image_steps.labels(model=self.model, sampler=job.chain.sampler).inc(job.n * job.calls)
            if job.request.guidance_scale:
                self.guided_image_steps.labels(model=self.model).inc(job.n * job.calls)
            in_time = job.due is None or job.finished is None or job.finished <= job.due
            if job.due is not None:
                self.slo.labels(model=self.model, priority=str(job.priority), result="met" if in_time else "missed").inc()
            if in_time:
                self.goodput.labels(model=self.model, priority=str(job.priority)).inc(job.n)

    def on_preempted(self, rows_by_priority: dict[int, int]) -> None:
        for priority, rows in rows_by_priority.items():
            self.preemptions.labels(priority=str(priority)).inc(rows)

    def on_refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def watch_backlog(self, seconds: Callable[[], float]) -> None:
        self.backlog.set_function(seconds)

    def watch_call_size(self, rows: Callable[[], float]) -> None:
        self.call_size.set_function(rows)

    def watch_answer_reserve(self, seconds: Callable[[], float]) -> None:
        self.answer_reserve.set_function(seconds)

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
            self.requests.labels(model=self.model, code=str(code)).inc()
            self.request_duration.labels(model=self.model, outcome=outcome).observe(seconds)
