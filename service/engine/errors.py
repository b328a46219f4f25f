"""Why a job is refused or fails. The API maps each to a status (``service.api.errors``)."""

from __future__ import annotations

from ddpm.finite_images import not_finite_message


class EngineError(RuntimeError):
    """Base class of the reasons a job is refused or fails."""


class QueueFull(EngineError):
    """More images waiting than DDPM_MAX_QUEUE: refused at submit."""


class Draining(EngineError):
    """The server is shutting down: refused at submit."""


class DeadlineUnmeetable(EngineError):
    """The request's deadline cannot be met given the work ahead of it: refused at submit (503 +
    Retry-After from the predicted wait), not accepted and timed out later."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    """The job's deadline passed; its samples left the batch."""


class Cancelled(EngineError):
    """The client went away (or the engine stopped before the job began)."""


class EngineFault(EngineError):
    """An exception inside one stage of an iteration; fails the jobs that stage touched."""

    def __init__(self, stage: str, exc: BaseException, what: str | None = None, *, said: str | None = None) -> None:
        """``said``: the client's message and the log's cause both, where the fault is the model's to tell (no paths or
        sizes in it); otherwise the client sees the stage and the exception type, and its message goes to the log only."""
        self.stage = stage
        self.cause = said or f"{type(exc).__name__}: {exc}"
        what = what or f"the engine's {stage} stage"
        super().__init__(said or f"{what} failed ({type(exc).__name__}); the server log has the details")


class ModelFailure(EngineFault):
    """The U-Net call or the fused step raised."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(stage, exc, "model call" if stage == "unet" else "denoising step")


class NonFiniteImages(EngineFault):
    """The chain ended in NaN or infinity for some of a job's images: the job fails (it was answered with black squares,
    NaN cast to 0). The reason is the model's, and the client is told it (no paths or sizes in it)."""

    def __init__(self, images: list[int]) -> None:
        message = not_finite_message(images)
        super().__init__("output", FloatingPointError(message), said=message)


class EngineStopped(EngineError):
    """The engine thread ended (a bug or a fatal fault): the job was not run; another replica can."""


class DrainTimeout(EngineError):
    """The server is shutting down and the job could not finish: the drain deadline passed, or a second signal stopped
    the server at once."""
