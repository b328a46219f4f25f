"""All server configuration: one typed object read from ``DDPM_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ddpm.names import DEFAULT_SAMPLER, DEFAULT_SPACING, MAX_THREADS, CompileSetting, PrecisionSetting, SamplerName, SpacingName
from ddpm.shipped_models import DEFAULT_MODEL
from service.engine.request_queue import SchedulingName


class Settings(BaseSettings):
    # a finite number everywhere: DDPM_RESPONSE_CACHE_MB=inf stopped the start (OverflowError), DDPM_DEFAULT_DEADLINE_S=inf
    # made every answer a 500 (its JSON echo), DDPM_DRAIN_TIMEOUT_S=inf drained with no bound
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore", allow_inf_nan=False)

    model: str = Field(
        str(DEFAULT_MODEL),
        description="a ddpm-serve model directory, a local diffusers DDPM directory, or a Hugging Face Hub repository "
        "org/name[@revision] resolved through the hub cache (HF_HUB_OFFLINE=1 honoured)",
    )
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    max_batch: int = Field(64, ge=1, le=4096, description="samples per denoising iteration (the running batch)")
    max_queue: int = Field(1024, ge=1, description="images waiting for a batch slot before new requests get 503")
    max_images_per_request: int = Field(64, ge=1, description="upper bound of batch_size in POST /generate")
    default_sampler: SamplerName = Field(
        DEFAULT_SAMPLER,
        description="the sampler of a request that names none: restart sampling on SDE-DPM-Solver++(2M) at 10 calls is within "
        "the real-vs-real spread of the 1000-step chain's quality (BENCHMARKS.md, samplers)",
    )
    default_steps: int | None = Field(
        10, ge=1, description="U-Net calls per image of a request that names no steps (unset: T); sampler ddpm named alone runs T"
    )
    default_timestep_spacing: SpacingName = Field(
        DEFAULT_SPACING,
        description="timestep spacing of a request that names none, where the model names none (a diffusers model's config does)",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of a request; past it: 504 and its samples leave")
    step_backend: Literal["auto", "triton", "torch"] = Field("auto", description="the fused step: Triton on CUDA, PyTorch twin on CPU")
    compile: CompileSetting = Field(
        "auto", description="torch.compile the U-Net (channels-last) and the CPU step: auto = where a compiler exists"
    )
    compile_before_ready: bool = Field(
        False,
        description="with compile=auto: keep /readyz at 503 until the compiled graphs are built (minutes on a CPU); "
        "false: ready on the eager path in seconds, each batch size switching to its compiled graph once built",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="a directory of torch.compile cache artefacts (ddpm compile-cache; the image ships the shipped model's): "
        "loaded before compiling when built for this machine, written after compiling when it is writable",
    )
    precision: PrecisionSetting = Field(
        "auto", description="the U-Net's precision: auto (bf16 where the device has it natively), fp32, bf16, fp16 (CUDA)"
    )
    cuda_graphs: bool = Field(
        True, description="on CUDA, replay the compiled U-Net as CUDA graphs (one per batch bucket; 5x per call at batch 1-16 on an H200)"
    )
    threads: int = Field(  # the bound: 100000 was a segfault
        0, ge=0, le=MAX_THREADS, description="torch CPU threads (0: PyTorch's default, capped at the cgroup's CPU quota)"
    )
    gil_switch_interval_ms: float = Field(
        5.0, gt=0, le=100, description="sys.setswitchinterval (Python's default 5 ms): how long the engine's thread may wait for the GIL "
        "while a request thread runs Python (BENCHMARKS.md, the other core)"
    )
    warmup_steps: int = Field(2, ge=0, description="denoising iterations run at startup before /readyz turns 200")
    drain_timeout_s: float = Field(600.0, ge=0, description="on SIGTERM: how long in-flight requests may still run")
    stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="an engine with work that finishes no iteration for this long is stalled: /healthz and /readyz 503 from "
        "then on, the requests in flight get 503 + Retry-After, and ddpm serve exits 1",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503")
    api_token: SecretStr | None = Field(
        None,
        description="bearer token required on /generate, /v1/*, /schedule and /info (unset: open); prefer the file: "
        "a command line is visible to every user of the host",
    )
    api_token_file: Path | None = Field(
        None, description="file holding the bearer token, or several one per line; followed while serving (wins over DDPM_API_TOKEN)"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS with, beside tls_key_file; followed while serving (a renewed "
        "Secret is loaded for new connections); unset: plain HTTP (TLS ended by the load balancer)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file, without a pass phrase")
    metrics_require_token: bool = Field(False, description="also require the token on /metrics")
    max_body_bytes: int | None = Field(
        None,
        ge=256,
        description="larger request bodies get 413; unset: room for the model's largest input image and mask "
        "(two base64 float64 .npy of its shape, at least 64 KiB each) and 16 KiB more (GET /info: limits.max_body_bytes)",
    )
    max_images_per_client: int = Field(256, ge=1, description="images one client may have queued or running; more gets 429")
    max_calls_per_request: int = Field(
        65536,
        ge=1,
        description="U-Net row-calls one request may cost (images x calls per image, RePaint's resampling included, x2 for a "
        "guided image), computed on arrival: more gets 422 naming the cost (64 images of the paper's 1000-step chain fit)",
    )
    max_calls_per_client: int = Field(
        262144, ge=1, description="U-Net row-calls one client may have queued or running (as max_images_per_client, in calls); 429"
    )
    max_resident: int | None = Field(
        None,
        ge=1,
        description="rows the running batch holds (at least max_batch; unset: 4 x max_batch): beyond one U-Net call's, so a "
        "waiting request gets rows and shares iterations at once instead of waiting for whole chains to end",
    )
    max_slowdown: float = Field(
        10.0,
        ge=0,
        description="a request without a deadline is planned to take at most this many times its time alone while it shares "
        "the batch (iterations kept short enough for it; never a refusal); 0: off",
    )
    tune_call_size: bool = Field(
        True,
        description="while more rows are resident than one call takes, a U-Net call takes the count (up to max_batch) the "
        "engine measured the best rows per second at: fewer than max_batch where a full batch is slower per row (a CPU: "
        "349 rows/s at 24-32 rows against 282 at 64, the shipped model compiled); false: always max_batch",
    )
    deadline_margin_s: float = Field(
        0.005,
        ge=0,
        description="of a request's deadline, seconds kept beyond the measured time to encode its answer: for writing it, "
        "the network and the client reading it (the server plans to have the images done that much earlier)",
    )
    default_deadline_s: float | None = Field(
        None, gt=0, description="the deadline of a request that names none, seconds from arrival (unset: none)"
    )
    min_priority: int = Field(
        -10, description="the lowest (most urgent) priority a request may ask for on a server with DDPM_API_TOKEN; lower is clamped"
    )
    min_priority_anonymous: int = Field(
        0, description="the lowest priority a request may ask for on an open server (no token): by default nobody jumps the queue"
    )
    max_priority: int = Field(10, description="the highest (least urgent) priority; higher is clamped")
    trust_forwarded_for: bool = Field(False, description="identify clients by the last X-Forwarded-For hop (behind our nginx)")
    root_path: str = Field(
        "", description="the path a proxy serves this replica under (/ddpm), for the interactive docs (/docs) and the schema's "
        "servers; empty: served at /"
    )
    cors_allow_origins: str = Field(
        "", description="origins a browser app may call this API from, comma-separated (http://localhost:5173), or *; empty: none"
    )
    otlp_traces_endpoint: str | None = Field(
        None, description="OTLP/HTTP endpoint to send a span per request to (http://collector:4318/v1/traces; the [otel] extra); "
        "unset: no spans (the access log still carries a traceparent's trace_id)"
    )
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per line")
    max_connections: int = Field(
        1024, ge=1, description="open connections (and requests in progress) before new requests get 503 (uvicorn limit_concurrency)"
    )
    request_read_timeout_s: float = Field(
        10.0, gt=0, description="a connection must deliver a request's headers, and then its body, within this many seconds (408)"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, le=3600, description="an idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive); behind a "
        "balancer that keeps connections to the replicas, above its own idle timeout (an ALB's 60 s: 65), else a request it sends "
        "on a connection the replica is closing fails (502)"
    )
    fault_every_n_iterations: int = Field(0, ge=0, description="testing only: every Nth model call raises (0: never)")
    fault_rate: float = Field(0.0, ge=0, le=1, description="testing only: probability that each listed stage raises")
    fault_stages: str = Field(
        "", description="testing only: comma-separated stages for fault_rate (admit,unet,step,advance,observer,encode,loop)"
    )
    fault_seed: int = Field(0, description="testing only: seed of the fault draws")
    fault_duration_s: float = Field(0.0, ge=0, description="testing only: faults stop this long after the server is ready (0: never)")
    fault_stall_s: float = Field(0.0, ge=0, description="testing only: the first U-Net call after ready blocks this long (a hung device)")
    response_cache_mb: float = Field(
        64.0,
        ge=0,
        description="memory for finished images answered again to identical requests (ETag, 304), and shared while made; 0: off",
    )
    retry_grace_s: float = Field(
        2.0,
        ge=0,
        le=600,
        description="a job whose every client went away runs on this long, so that a client's retry (the identical request) "
        "finds it and shares it instead of starting over; 0: cancelled at once; with the response cache on only",
    )
    sse_keepalive_s: float = Field(
        15.0, gt=0, description="a stream that has sent nothing for this long sends a comment line (proxies drop silent connections)"
    )
    scheduling: SchedulingName = Field(
        "continuous", description="continuous: samples join the running batch every iteration; request: a batch runs its whole chain"
    )

    @model_validator(mode="before")
    @classmethod
    def _without_surrounding_whitespace(cls, values: object) -> object:
        """An env file saved with Windows line ends gives every value a trailing CR: "DDPM_LOG_FORMAT: ... (got
        'text\\r')", and DDPM_MODEL's "model directory not found: /models/x\\r (set ..." drew its own line over itself.
        A value's surrounding whitespace is never meant (a token's was stripped already)."""
        if not isinstance(values, dict):
            return values
        return {k: v.strip() if isinstance(v, str) else v for k, v in values.items()}

    @model_validator(mode="after")
    def _priority_bounds_in_order(self) -> Settings:
        """A floor over the ceiling inverted the clamp silently (every request at max_priority)."""
        for floor in ("min_priority", "min_priority_anonymous"):
            if getattr(self, floor) > self.max_priority:
                raise ValueError(f"DDPM_{floor.upper()} ({getattr(self, floor)}) is over DDPM_MAX_PRIORITY ({self.max_priority})")
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        from service.api.cors import parse_origins

        return ",".join(parse_origins(value))

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _an_http_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        parts = urlsplit(value or "")
        if value is not None and not (parts.scheme in ("http", "https") and parts.hostname):
            raise ValueError(f"{value!r} is not an http:// or https:// URL (OTLP over HTTP: http://collector:4318/v1/traces)")
        return value

    @field_validator("root_path")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or "//" in value or any(c in value for c in "?#% ")):
            raise ValueError(f"{value!r} is not a path prefix: give one like /ddpm (a leading /, no query)")
        return value.rstrip("/")

    @field_validator("fault_stages")
    @classmethod
    def _known_stages(cls, value: str) -> str:
        from service.fault_injection import check_stages

        return ",".join(check_stages(tuple(v.strip() for v in value.split(",") if v.strip())))

    @property
    def fault_stage_list(self) -> tuple[str, ...]:
        return tuple(v for v in self.fault_stages.split(",") if v)


@lru_cache
def get_settings() -> Settings:
    return Settings()
