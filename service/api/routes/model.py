"""What this replica serves: ``GET /schedule`` (the noise schedule, and any chain's coefficient table)
and ``GET /info`` (the model, its measured facts, the samplers, the limits, the hot path)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ddpm import __version__
from ddpm.chain import ChainSpec, ChainTables, StepCoefficients
from ddpm.editing import EDIT_ROW
from ddpm.names import SAMPLERS, SPACINGS, SamplerName, SpacingName
from service.api.deps import Authorized, StateDep, StrictQuery
from service.api.errors import documented, not_ready
from service.api.generation import resolve_chain
from service.api.schemas import ChainTable, Defaults, InfoResponse, Limits, ModelDescription, ScheduleResponse
from service.api.strict_json import StrictJSONRoute
from service.engine.background_compile import fully_compiled
from service.server_state import ServerState

router = APIRouter(route_class=StrictJSONRoute)


@router.get(
    "/schedule",
    response_model=ScheduleResponse,
    responses=documented(401, 422, 503),
    summary="The noise schedule of the loaded model",
    dependencies=[StrictQuery],
)
async def schedule(
    state: StateDep,
    _: Authorized,
    sampler: Annotated[SamplerName | None, Query(description="with steps/eta/timestep_spacing: return that chain's table")] = None,
    steps: Annotated[int | None, Query(ge=1)] = None,
    eta: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
    timestep_spacing: Annotated[SpacingName | None, Query()] = None,
    clip_denoised: Annotated[bool | None, Query()] = None,
) -> ScheduleResponse:
    if state.model is None:
        raise not_ready(state)
    m = state.model
    chain = None
    if m.distilled_chain is not None or any(v is not None for v in (sampler, steps, eta, timestep_spacing, clip_denoised)):
        spec = resolve_chain(state, sampler, steps, eta, timestep_spacing, clip_denoised, where="query")
        tables = state.engine.chain_tables(spec) if state.engine is not None else ChainTables.for_spec(m.schedule, m.variance_type, spec)
        chain = _chain_table(tables, spec)
    return ScheduleResponse(**m.schedule.to_dict(), variance_type=m.variance_type.value, clip_denoised=m.clip_denoised, chain=chain)  # type: ignore[arg-type]


def _chain_table(tables: ChainTables, spec: ChainSpec) -> ChainTable:
    """The table in the order the steps run (position S-1 first), as the float32 values the engine uses."""
    order = list(reversed(range(tables.num_steps)))
    timesteps = [int(tables.timesteps[i]) for i in order]
    return ChainTable(
        sampler=spec.sampler,
        steps=spec.steps,
        eta=spec.eta,
        timestep_spacing=spec.spacing,
        steps_offset=spec.steps_offset,
        clip_denoised=spec.clip,
        timesteps=timesteps,
        noise_counter=[int(tables.counters[i]) for i in order],
        coefficients={name: tables.table[row, order].tolist() for row, name in enumerate(StepCoefficients.names())},
        **_jumps(tables, spec, order),
    )


def _jumps(tables: ChainTables, spec: ChainSpec, order: list[int]) -> dict[str, list[float]]:
    """A restart chain's forward jumps (RePaint's need the request's mask and image: not a chain table)."""
    if tables.edit_table is None or spec.repaint:
        return {}
    return {name: tables.edit_table[EDIT_ROW[name], order].tolist() for name in ("jump_x", "jump_z")}


@router.get(
    "/info",
    response_model=InfoResponse,
    responses=documented(401, 503),
    summary="What this replica serves: model (name, weights SHA-256, size, cost per image-step), samplers, limits, device",
)
async def info(state: StateDep, _: Authorized) -> InfoResponse:
    if state.model is None or state.facts is None:
        raise not_ready(state)
    return server_info(state)  # facts measured at load: nothing here runs torch (service/server_state.py, "Threads")


def server_info(state: ServerState) -> InfoResponse:
    model, facts, s = state.model, state.facts, state.settings
    assert model is not None and facts is not None
    gflop = facts.gflop_per_image_step
    hot_path = state.hot_path_states()
    # what a request that names no chain gets: a distilled model's own chain, else the settings'
    own = model.own_chain(None, None, None) if model.distilled_chain else (s.default_sampler, s.default_steps, s.default_timestep_spacing)
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
            prediction=model.prediction,
            distilled_chain=model.distilled_chain,
        ),
        samplers=list(SAMPLERS),
        timestep_spacings=list(SPACINGS),
        defaults=Defaults(sampler=own[0], steps=own[1], timestep_spacing=own[2]),
        limits=Limits(
            max_batch=s.max_batch,
            max_images_per_request=s.max_images_per_request,
            max_queue=s.max_queue,
            max_images_per_client=s.max_images_per_client,
            max_calls_per_request=s.max_calls_per_request,
            max_calls_per_client=s.max_calls_per_client,
            request_timeout_s=s.request_timeout_s,
            max_body_bytes=state.max_body_bytes(),
            max_input_bytes=state.max_input_bytes(),
        ),
        device=facts.device,
        precision=state.precision,
        compiled=fully_compiled(hot_path),
        hot_path=hot_path,
        compiled_batches=state.compiled_batches(),
        compile_fallbacks=state.compile_fallbacks(),
        step_backend=state.step_backend(),
        scheduling=s.scheduling,
        response_cache_bytes=state.cache.max_bytes,
        classes=list(model.class_names),
        guidance_scale=model.guidance_scale,
    )
