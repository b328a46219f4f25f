"""Request and response bodies of the HTTP API (the OpenAPI contract)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ddpm.seeding import MAX_SEED


class GenerateRequest(BaseModel):
    """Strict types: 0 is not false, "5" is not 5, 5.0 is not 5; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(..., strict=True, ge=0, lt=MAX_SEED, description="0 <= seed < 2^63. Image k uses Philox key image_seed(seed, k).")
    batch_size: int = Field(1, strict=True, ge=1, description="Number of images (1..DDPM_MAX_IMAGES_PER_REQUEST).")
    steps: int | None = Field(
        None, strict=True, ge=1, description="Chain length S (1..T); default T, the paper's full chain. S < T respaces."
    )
    clip_denoised: bool | None = Field(
        None, strict=True, description="Clip the predicted x0 to [-1, 1] at every step; default: the model's setting."
    )


class Timings(BaseModel):
    queue_wait_s: float = Field(..., description="Arrival to the first denoising iteration.")
    generation_s: float = Field(..., description="First iteration to the last image done.")
    total_s: float = Field(..., description="Arrival to answer.")


class GenerateResponse(BaseModel):
    seed: int
    batch_size: int
    steps: int
    model: str
    precision: str = Field(..., description="The U-Net's precision (fp32, bf16, fp16): part of what image k depends on.")
    images: list[str] = Field(..., description="One base64-encoded PNG per image, in image order k = 0..batch_size-1.")
    timings: Timings


class ScheduleResponse(BaseModel):
    num_timesteps: int
    kind: str
    params: dict[str, float]
    variance_type: str
    clip_denoised: bool
    betas: list[float]
    alphas_cumprod: list[float]
    sqrt_alphas_cumprod: list[float]
    sqrt_one_minus_alphas_cumprod: list[float]
    posterior_variance: list[float]
    posterior_mean_coef1: list[float]
    posterior_mean_coef2: list[float]


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorResponse(BaseModel):
    detail: str = Field(..., description="One line naming each bad field, e.g. 'batch_size: Input should be greater than or equal to 1'")
    errors: list[dict[str, Any]] = Field(..., description="pydantic's structured errors (type, loc, msg, input)")
