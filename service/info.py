"""``GET /info``: what this replica serves and how, from the loaded model, its measured facts and the settings."""

from __future__ import annotations

from ddpm import __version__
from ddpm.respace import SPACINGS
from ddpm.samplers import Sampler
from service.engine.background_compile import fully_compiled
from service.schemas import Defaults, InfoResponse, Limits, ModelDescription
from service.server_state import ServerState


def server_info(state: ServerState) -> InfoResponse:
    model, facts, s = state.model, state.facts, state.settings
    assert model is not None and facts is not None
    gflop = state.gflop_per_image_step()
    hot_path = state.hot_path_states()
    return InfoResponse(
        version=__version__,
        model=ModelDescription(
            name=model.name,
            source=model.source,
            weights_sha256=facts.weights_sha256,
            fingerprint=facts.fingerprint,
            parameters=facts.parameters,
            gflop_per_image_step=None if gflop is None else float(f"{gflop:.6g}"),
            image_shape=list(model.image_shape),
            num_timesteps=model.schedule.num_timesteps,
            schedule=model.schedule.kind,
            schedule_params=dict(model.schedule.params),
            variance_type=model.variance_type.value,
            clip_denoised=model.clip_denoised,
            timestep_spacing=model.timestep_spacing,
            steps_offset=model.steps_offset,
        ),
        samplers=[v.value for v in Sampler],
        timestep_spacings=list(SPACINGS),
        defaults=Defaults(sampler=s.default_sampler, steps=s.default_steps, timestep_spacing=s.default_timestep_spacing),
        limits=Limits(
            max_batch=s.max_batch,
            max_images_per_request=s.max_images_per_request,
            max_queue=s.max_queue,
            max_images_per_client=s.max_images_per_client,
            request_timeout_s=s.request_timeout_s,
            max_body_bytes=s.max_body_bytes,
        ),
        device=facts.device,
        precision=state.precision,
        compiled=fully_compiled(hot_path),
        hot_path=hot_path,
        step_backend=state.step_backend(),
        scheduling=s.scheduling,
        response_cache_bytes=state.cache.max_bytes,
        classes=list(model.class_names),
        guidance_scale=model.guidance_scale,
    )
