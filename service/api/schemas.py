"""Request and response bodies of the HTTP API (the OpenAPI contract)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo, field_validator
from pydantic_core import PydanticUndefined

from ddpm.names import SamplerName, SpacingName, parse_class_labels
from ddpm.seeding import MAX_SEED
from service.engine.previews import MAX_PREVIEWS

ClassLabel = StrictInt | Annotated[StrictStr, Field(max_length=256)]  # a class index or name


FIRST_IMAGE = ("Index k of the first image: the answer holds images first_image..first_image+n-1 of the seed, each the same as "
               "in any other request that asks for it (a set larger than DDPM_MAX_IMAGES_PER_REQUEST, asked for in parts).")


def _null_takes_the_default(schema: dict[str, Any]) -> None:
    """The contract says what ``_null_is_the_default`` accepts: a property with a default other than null takes null
    too (``batch_size``, ``first_image``, /v1's ``n``; the schema said integer, so a schema-driven fuzzer flagged
    ``"first_image": null``'s 200 as a violation, and a generated client could not send it)."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default") is None or any(a.get("type") == "null" for a in prop.get("anyOf", [prop])):
            continue
        outer = {k: prop.pop(k) for k in ("default", "description", "title") if k in prop}
        alternatives = prop.pop("anyOf", None) or [dict(prop)]
        prop.clear()
        prop.update(anyOf=[*alternatives, {"type": "null"}], **outer)


class ChainRequest(BaseModel):
    """The chain fields every generation endpoint takes. Strict types: 0 is not false, "5" is not 5,
    5.0 is not 5; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_null_takes_the_default)

    first_image: int = Field(0, strict=True, ge=0, lt=MAX_SEED, description=FIRST_IMAGE)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: object, info: ValidationInfo) -> object:
        """``null`` for a field with a default is that default, as it already was for every optional field: OpenAI's
        spec makes ``n`` nullable, and generated clients send null for what the caller left out (``batch_size``,
        ``n`` and ``first_image`` were 422)."""
        if value is None and info.field_name is not None:
            default = cls.model_fields[info.field_name].default
            return None if default is PydanticUndefined else default
        return value

    steps: int | None = Field(
        None,
        strict=True,
        ge=1,
        description="U-Net calls per image, S (1..T); default T for sampler ddpm (the paper's chain), else DDPM_DEFAULT_STEPS (10). "
        "S < T respaces the chain.",
    )
    sampler: SamplerName | None = Field(
        None,
        description="ddpm: Algorithm 2 (with steps=T, the paper's chain); ddim: DDIM (Song et al. 2021); "
        "dpmsolver++: DPM-Solver++(2M) (Lu et al. 2022); sde-dpmsolver++: its stochastic variant; restart: restart "
        "sampling (Xu et al. 2023) on sde-dpmsolver++, one jump back up over the last two steps (steps counts every call). "
        "Default DDPM_DEFAULT_SAMPLER (restart).",
    )
    eta: float | None = Field(
        None, strict=True, ge=0, le=1, description="ddim only: 0 deterministic (default), 1 the DDPM posterior variance."
    )
    timestep_spacing: SpacingName | None = Field(
        None, description="Which S of the T timesteps: linspace, leading or trailing (as diffusers); default DDPM_DEFAULT_TIMESTEP_SPACING."
    )
    clip_denoised: bool | None = Field(
        None, strict=True, description="Clip the predicted x0 to [-1, 1] at every step; default: the model's setting."
    )

    class_label: ClassLabel | Annotated[list[ClassLabel], Field(max_length=4096)] | None = Field(
        None,
        description="A class-conditional model only (GET /info lists its classes): the class of every image, by index (a "
        "number) or name (a string; digits that name no class are an index, unless the classes are named by numbers), a "
        "list with one per image, or \"balanced\" (image k of the seed: class k mod the number of classes). Default: "
        "unconditional (the null label).",
    )
    guidance_scale: float | None = Field(
        None,
        strict=True,
        ge=0,
        le=50,
        allow_inf_nan=False,
        description="Classifier-free guidance w, with class_label: eps = (1 + w) eps(x, t, y) - w eps(x, t, null); 0: plain "
        "conditional sampling (one U-Net row per image-step instead of two). Default: the model card's.",
    )


class SchedulingFields(BaseModel):
    """How a request is served (not what it makes: neither changes an image, the cache key or the ETag)."""

    model_config = ConfigDict(extra="forbid")

    priority: int | None = Field(
        None,
        strict=True,
        ge=-(2**31),
        le=2**31,
        description="Lower runs first (vLLM's convention); rows of a worse priority sit iterations out for it. Default 0. "
        "Clamped to [DDPM_MIN_PRIORITY, DDPM_MAX_PRIORITY] with the API token, to [DDPM_MIN_PRIORITY_ANONYMOUS, ...] on an "
        "open server; the answer says which priority was used.",
    )
    deadline_s: float | None = Field(
        None,
        strict=True,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description="Seconds from arrival by which the answer is wanted: the scheduler orders rows by their slack, and a "
        "request that cannot make it given the work ahead is refused at once (503 + Retry-After) instead of timing out "
        "later. Default DDPM_DEFAULT_DEADLINE_S (none).",
    )


class EditFields(BaseModel):
    """Editing an input image (ddpm/editing.py): variations (SDEdit) and inpainting (RePaint)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(
        None,
        max_length=2**24,
        description="The input image, a base64 PNG (or JPEG, WebP) of the model's size (GET /info: image_shape; 1 channel: grey, "
        "3: RGB), or a base64 .npy float array (C, H, W) in [0, 1]; a data: URL of either, and base64 in lines, are taken. At most "
        "GET /info's limits.max_input_bytes before base64. With strength < 1 the chain starts from it noised (SDEdit); "
        "with a mask its known pixels are kept.",
    )
    mask: str | None = Field(
        None,
        max_length=2**24,
        description="Inpainting (RePaint): a base64 PNG of the image's size whose fully transparent pixels (alpha 0, as "
        "OpenAI's edits; an alpha channel, a palette's alpha or a tRNS colour key) mark what to repaint; a mask without "
        "transparent pixels marks them black (grey under 128); a .npy array marks them 0. Needs image. "
        "Encoded and bounded as image.",
    )
    strength: float | None = Field(
        None,
        strict=True,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="With image: the share of the chain run from the noised input (SDEdit; steps count the U-Net calls run). "
        "Default 0.4 for a variation (it keeps the digit in ~80% of variations on the shipped model), 1 with a mask.",
    )
    jump_length: int | None = Field(
        None, strict=True, ge=1, le=1000, description="With mask: RePaint's resampling jump j, in steps (default 5)."
    )
    jump_n_sample: int | None = Field(
        None,
        strict=True,
        ge=1,
        le=20,
        description="With mask: RePaint's samplings r per jump point (default 2; 1: no resampling; each extra costs about steps more "
        "U-Net calls).",
    )


class GenerateRequest(ChainRequest, EditFields, SchedulingFields):
    seed: int = Field(..., strict=True, ge=0, lt=MAX_SEED, description="0 <= seed < 2^63. Image k uses Philox key image_seed(seed, k).")
    batch_size: int = Field(1, strict=True, ge=1, description="Number of images (1..DDPM_MAX_IMAGES_PER_REQUEST).")
    previews: int = Field(0, strict=True, ge=0, le=MAX_PREVIEWS, description="/generate/stream only: preview events of each image "
                          "while its chain runs, the model's prediction of x_0 (Ho et al. Eq. 15) after 1/(P+1), 2/(P+1)... of its "
                          "U-Net calls; fewer on a short chain, none for images already made.")  # fmt: skip


class Timings(BaseModel):
    queue_wait_s: float = Field(..., description="Arrival to the first denoising iteration.")
    generation_s: float = Field(..., description="First iteration to the last image done.")
    total_s: float = Field(..., description="Arrival to answer.")


class ChainAnswer(BaseModel):
    """What every generation answer (ours and OpenAI's dialect) says of the chain that made its images:
    with the model's fingerprint, all that image k depends on (``service.api.generation.chain_fields``)."""

    seed: int
    first_image: int = Field(0, description="Index k of the answer's first image (images[i] is image first_image + i).")
    steps: int
    sampler: str
    eta: float
    timestep_spacing: str
    clip_denoised: bool = Field(..., description="Whether each step's predicted x0 was clipped to [-1, 1].")
    model: str
    fingerprint: str = Field(
        ..., description="The served model's fingerprint (GET /info: model.fingerprint): which weights and schedule made the images."
    )
    precision: str = Field(..., description="The U-Net's precision (fp32, bf16, fp16): part of what image k depends on.")
    cached: bool = Field(False, description="Answered from the response cache (the same images, no U-Net call).")
    class_labels: list[str] | None = Field(None, description="The class name of each image (a class-conditional request).")
    guidance_scale: float = Field(0.0, description="The classifier-free guidance scale w used (0: none).")
    strength: float = Field(1.0, description="The share of the chain run from the input (1: from pure noise).")
    jump_length: int | None = Field(None, description="RePaint's jump j (inpainting only).")
    jump_n_sample: int | None = Field(None, description="RePaint's resamplings r (inpainting only).")
    input_sha256: str | None = Field(None, description="SHA-256 of the input image's and the mask's pixels (editing only).")


class SchedulingAnswer(BaseModel):
    priority: int = Field(0, description="The priority the request ran at (after the server's bounds).")
    deadline_s: float | None = Field(None, description="The deadline it was scheduled against, seconds from arrival.")


class GenerateResponse(ChainAnswer, SchedulingAnswer):
    batch_size: int
    images: list[str] = Field(..., description="One base64-encoded PNG per image: image k = first_image + i at index i.")
    timings: Timings


class ChainTable(BaseModel):
    """Every step of one chain, in the order they run: for step j (0..S-1), with z ~ N(0, I) drawn
    from Philox key image_seed(seed, k) at counter noise_counter[j],

        x0_hat = x0_from_x[j] x - x0_from_eps[j] eps(x, timesteps[j]), clipped to [-1, 1] if clip[j] = 1
        x      = x[j] x + eps[j] eps + x0[j] x0_hat + x0_prev[j] (x0_hat of step j-1) + sigma[j] z

    starting from x_T drawn at counter 0. Values are the float32 numbers the server uses. A chain that
    jumps back up (``restart``) also gives ``jump_x``/``jump_z``; step j then ends with the forward jump
    folded in: x = jump_x[j] (x - sigma[j] z) + sqrt((jump_x[j] sigma[j])^2 + jump_z[j]^2) z (1 and 0: no jump)."""

    sampler: str
    steps: int
    eta: float
    timestep_spacing: str
    steps_offset: int
    clip_denoised: bool
    timesteps: list[int]
    noise_counter: list[int]
    coefficients: dict[str, list[float]]
    jump_x: list[float] | None = None
    jump_z: list[float] | None = None


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
    chain: ChainTable | None = Field(None, description="With ?sampler= or ?steps=: the exact per-step coefficients of that chain.")


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorResponse(BaseModel):
    detail: str = Field(..., description="One line naming each bad field, e.g. 'batch_size: Input should be greater than or equal to 1'")
    errors: list[dict[str, Any]] = Field(
        ...,
        description="pydantic's structured errors (type, loc, msg, input; ctx where the error has numbers to act on: a request "
        "over DDPM_MAX_CALLS_PER_REQUEST has {cost, bound, calls_per_image})",
    )


class ModelDescription(BaseModel):
    name: str = Field(..., description="The directory's name, or the hub repository id (org/name[@revision]).")
    source: str = Field(..., description="ddpm-serve or diffusers")
    weights_sha256: str = Field(..., description="sha256sum of the weights file (several files: of their '<sha256>  <path>' lines)")
    fingerprint: str = Field(
        ...,
        description="SHA-256 of the weights, every config file, the resolved schedule and variance, and the code version: "
        "the response cache and ETags are keyed on it (with precision and device type)",
    )
    parameters: int
    gflop_per_image_step: float | None = Field(
        ..., description="One U-Net call on one image (convolutions, matmuls, attention; 1 FMA = 2 FLOP); null if it cannot be counted"
    )
    image_shape: list[int] = Field(..., description="[channels, height, width]")
    num_timesteps: int = Field(..., description="T")
    schedule: str
    schedule_params: dict[str, float]
    variance_type: str
    clip_denoised: bool
    timestep_spacing: str | None = Field(..., description="The model's own spacing (a diffusers config's), else null")
    steps_offset: int
    prediction: str = Field("eps", description="What the U-Net outputs: eps, or v (a distilled student; the server converts to eps)")
    distilled_chain: dict[str, Any] | None = Field(
        None,
        description="A distilled model (ddpm distill): the one chain it serves (sampler, steps, timestep_spacing), what a request "
        "that names none gets; any other chain, and edits, answer 422. null: any chain",
    )


class Limits(BaseModel):
    max_batch: int = Field(..., description="Samples per denoising iteration")
    max_images_per_request: int
    max_queue: int = Field(..., description="Images waiting before new requests get 503")
    max_images_per_client: int
    max_calls_per_request: int = Field(
        ..., description="U-Net row-calls one request may cost (images x calls per image, x2 guided); more gets 422 naming its cost"
    )
    max_calls_per_client: int = Field(..., description="U-Net row-calls one client may have queued or running; more gets 429")
    request_timeout_s: float
    max_body_bytes: int = Field(..., description="Larger request bodies get 413 (DDPM_MAX_BODY_BYTES, or room for max_input_bytes twice)")
    max_input_bytes: int = Field(..., description="Bytes of one input image or mask (PNG, JPEG, WebP or .npy), before base64")


class Defaults(BaseModel):
    sampler: str
    steps: int | None
    timestep_spacing: str


class InfoResponse(BaseModel):
    """What this replica serves and how (as TGI's /info)."""

    version: str = Field(..., description="ddpm-serve's version")
    model: ModelDescription
    samplers: list[str]
    timestep_spacings: list[str]
    defaults: Defaults
    limits: Limits
    device: str
    precision: str
    compiled: bool = Field(..., description="every batch size runs the compiled graphs")
    hot_path: dict[str, str] = Field(
        ...,
        description="per batch-size group (1, 2+): eager, compiling (served eagerly meanwhile), compiled or failed (stays eager)",
    )
    compiled_batches: dict[str, str] = Field(
        ...,
        description="the batch sizes with compiled graphs per call variant (unet, unet+labels, step, step+x0_prev, step+edit, "
        "step+x0_prev+edit), as ranges ('1-64'); any other shape runs eagerly while the compile thread builds it",
    )
    compile_fallbacks: int = Field(
        ..., description="calls run eagerly because no compiled graph covered their shape yet: compiles the serving thread did not do"
    )
    step_backend: str
    scheduling: str
    response_cache_bytes: int = Field(..., description="DDPM_RESPONSE_CACHE_MB in bytes; 0: off")
    classes: list[str] = Field(..., description="A class-conditional model's class names, label i = classes[i] (empty: unconditional)")
    guidance_scale: float | None = Field(..., description="The model card's recommended classifier-free guidance scale")


STREAM = ("Server-Sent Events as OpenAI streams images: partial_image events while the chain runs, then one completed event "
          "per image (each with image_index, this server's), or an error event.")
PARTIAL_IMAGES = ("With stream: previews of each image while its chain runs (0-3): the model's prediction of x_0 (Ho et al. Eq. 15) "
                  "after 1/(P+1), 2/(P+1)... of its U-Net calls; fewer on a short chain, none for images already made "
                  "(the response cache); sharing an identical request's job in flight, that job's where it makes as many.")


class ImageGenerationRequest(ChainRequest, SchedulingFields):
    """OpenAI's images API (``POST /v1/images/generations``), plus this server's own fields (the
    ``extra_body`` of the openai client): seed and the chain fields."""

    prompt: str = Field(
        ...,
        max_length=4000,
        description="Required by the OpenAI API. The served model is unconditional: the prompt does not change the images "
        "(only its length is logged).",
    )
    model: str | None = Field(None, description="The served model's name (GET /v1/models); another name is 404.")
    n: int = Field(1, strict=True, ge=1, description="Number of images (1..DDPM_MAX_IMAGES_PER_REQUEST).")
    size: str | None = Field(None, description="WIDTHxHEIGHT; only the model's own size (GET /info), which is the default, and "
                             "auto means it too.")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (the default); url is refused: this server keeps no images to link to."
    )
    user: str | None = Field(None, max_length=256, description="Your end user's id: logged with the request (deprecated by OpenAI "
                             "for safety_identifier).")
    safety_identifier: str | None = Field(None, max_length=256, description="Your end user's stable id: logged with the request "
                                          "as its user, before user where both are given.")
    seed: int | None = Field(
        None, strict=True, ge=0, lt=MAX_SEED, description="As in /generate; default: a random seed, returned in the answer."
    )
    # OpenAI's other options: what changes nothing here is accepted, what this model cannot do is a 400
    # naming the parameter (service.api.routes.openai_images.OPTIONS)
    quality: str | None = Field(None, max_length=32, description="auto or standard (one quality; steps and sampler set the cost).")
    style: str | None = Field(None, max_length=32, description="Refused when set: this model has no styles.")
    output_format: str | None = Field(None, max_length=32, description="png (the default, lossless), jpeg or webp.")
    output_compression: int | None = Field(None, strict=True, description="jpeg and webp: their quality, 0-100 (default 100).")
    background: str | None = Field(None, max_length=32, description="auto or opaque (the images have no alpha channel).")
    moderation: str | None = Field(None, max_length=32, description="auto or low: accepted; this server moderates nothing.")
    complexity: str | None = Field(None, max_length=32, description="Refused when set: nothing here plans an image apart from "
                                   "its steps.")
    stream: bool | None = Field(None, strict=True, description=STREAM)
    partial_images: int | None = Field(None, strict=True, ge=0, le=MAX_PREVIEWS, description=PARTIAL_IMAGES)


class ImageForm(BaseModel):
    """The multipart form of OpenAI's ``/v1/images/edits`` and ``/v1/images/variations``, with this
    server's own fields beside (the openai client's ``extra_body``). A form carries text: numbers are
    read from it (no strict types here), unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    image: UploadFile | None = Field(None, description="The input PNG (or JPEG, WebP), of the model's size (GET /info).")
    image_list: list[UploadFile] | None = Field(None, alias="image[]", description="OpenAI's list form: one image only here.")
    model: str | None = Field(None, description="The served model's name (GET /v1/models); another name is 404.")
    n: int = Field(1, ge=1, description="Number of images (1..DDPM_MAX_IMAGES_PER_REQUEST).")
    size: str | None = Field(None, description="WIDTHxHEIGHT; only the model's own size, which is the default (auto: it too).")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json (the default); url is refused.")
    user: str | None = Field(None, max_length=256, description="Your end user's id: logged with the request (deprecated by OpenAI "
                             "for safety_identifier).")
    safety_identifier: str | None = Field(None, max_length=256, description="Your end user's stable id: logged with the request "
                                          "as its user, before user where both are given.")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="As in /generate; default: a random seed, returned.")
    first_image: int = Field(0, ge=0, lt=MAX_SEED, description=FIRST_IMAGE)
    steps: int | None = Field(None, ge=1, description="As in /generate: U-Net calls per image over the part of the chain run.")
    sampler: SamplerName | None = Field(None, description="As in /generate (inpainting: ddpm or ddim; default ddpm).")
    eta: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="ddim only.")
    timestep_spacing: SpacingName | None = None
    clip_denoised: bool | None = None
    class_label: int | str | list[int | str] | None = Field(
        None,
        description="A class-conditional model: '7', 'seven', '1,2,3' (one per image) or 'balanced' (image k: class k mod the "
        "number of classes); a class name first, else digits an index (not where the classes are named by numbers).",
    )
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="As in /generate (variations: default 0.4).")
    priority: int | None = Field(None, ge=-(2**31), le=2**31, description="As in /generate: lower runs first.")
    deadline_s: float | None = Field(None, gt=0, le=86400, allow_inf_nan=False, description="As in /generate.")

    @field_validator("class_label", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        return parse_class_labels(value) if isinstance(value, str) else value

    def upload(self) -> UploadFile | None:
        """The input image (``image``, or OpenAI's ``image[]`` holding one file)."""
        return self.image if self.image is not None else (self.image_list[0] if self.image_list else None)


class ImageEditForm(ImageForm):
    prompt: str = Field(..., max_length=32000, description="Required by the OpenAI API; it does not condition this model.")
    mask: UploadFile | None = Field(
        None, description="A PNG whose fully transparent pixels (alpha channel, palette alpha or tRNS key) mark what to "
        "repaint, or with none its black ones; absent: the image's own transparency."
    )
    jump_length: int | None = Field(None, ge=1, le=1000, description="RePaint's resampling jump j (default 5).")
    jump_n_sample: int | None = Field(None, ge=1, le=20, description="RePaint's samplings r per jump point (default 2; 1: none).")
    # OpenAI's options with no effect here, as generations' (service.api.routes.openai_images.OPTIONS)
    quality: str | None = Field(None, max_length=32)
    background: str | None = Field(None, max_length=32)
    output_format: str | None = Field(None, max_length=32)
    output_compression: int | None = None
    input_fidelity: str | None = Field(None, max_length=32)
    complexity: str | None = Field(None, max_length=32)
    stream: bool | None = Field(None, description=STREAM)
    partial_images: int | None = Field(None, ge=0, le=MAX_PREVIEWS, description=PARTIAL_IMAGES)


class ImageData(BaseModel):
    b64_json: str = Field(..., description="A base64-encoded image in the answer's output_format (PNG by default).")


class ImagesResponse(ChainAnswer, SchedulingAnswer):
    """OpenAI's ImagesResponse, with this server's fields beside (clients ignore what they do not know)."""

    created: int = Field(..., description="Unix time of the answer.")
    data: list[ImageData]
    output_format: str = "png"
    size: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(..., description="Unix time the weights file was last modified.")
    owned_by: str = "ddpm-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
