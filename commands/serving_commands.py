"""The ``ddpm`` commands of the service: serve (``service.draining_server``), generate (``service.client``)
and compile-cache (the server's own background compile, written to a directory)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from commands.argument_types import (
    GUIDANCE_SCALE,
    NON_NEGATIVE,
    PORT,
    POSITIVE,
    POSITIVE_NUMBER,
    SEED,
    argument_text,
    from_environment,
    int_at_least,
    number_in,
)
from commands.process_exit import exit_at_once

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_serving_commands(sub: Any) -> None:
    add_serve_parser(sub)
    add_generate_parser(sub)
    add_compile_cache_parser(sub)


def add_serve_parser(sub: Any) -> None:
    """``ddpm serve``: every setting (service.settings.Settings) is a flag too, generated from the one
    definition by pydantic-settings' CLI source; a flag wins over its DDPM_* variable."""
    from pydantic_settings import CliSettingsSource

    from commands.help_format import DefaultsHelpFormatter
    from service.settings import Settings

    p = sub.add_parser(
        "serve",
        help="run the HTTP server (every DDPM_* setting is also a flag; the flag wins)",
        description="Run the HTTP server. Every setting is a flag and a DDPM_* environment variable; the flag wins.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=PORT, default=8000, help="port to bind")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=from_environment("DDPM_LOG_LEVEL", "info").lower(),
                   help="the server's log (default: $DDPM_LOG_LEVEL or info)")
    settings_flags = CliSettingsSource(
        Settings, root_parser=p, cli_kebab_case=True, cli_implicit_flags=True, cli_hide_none_type=True, cli_show_env_vars=True
    )
    p.set_defaults(func=cmd_serve, settings_flags=settings_flags)


def add_generate_parser(sub: Any) -> None:
    from commands.help_format import DefaultsHelpFormatter
    from commands.model_commands import add_edit_args
    from ddpm.names import SAMPLERS, SPACINGS

    text = ("ask a running server for images (service.client): -o grid.png, -o images.npy, or -o folder/ (one PNG per "
            "image, resumable), with a progress bar")
    p = sub.add_parser("generate", help=text, description=text, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--url", default=from_environment("DDPM_URL", "http://127.0.0.1:8000"),
                   help="the server, http:// or https:// (a private CA's certificate: SSL_CERT_FILE=ca.pem) (default: $DDPM_URL or local)")
    p.add_argument("--seed", type=SEED, default=0, help="image k uses the Philox key image_seed(seed, k)")
    p.add_argument("-n", type=POSITIVE, default=16,
                   help="number of images (more than the server's max_images_per_request: asked for in parts, the same images)")
    p.add_argument("--first-image", type=NON_NEGATIVE, default=None, help="images k = first..first+n-1 of the seed (default: 0)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="U-Net calls per image (default: the server's)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the server's")
    p.add_argument("--eta", type=number_in(0.0, 1.0), default=None, help="ddim only (default: 0)")
    p.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default: the server's)")
    p.add_argument("--clip", choices=["on", "off"], default=None, help="clip predicted x0 (default: the model's)")
    p.add_argument("--class-label", type=argument_text, default=None,
                   help="a class-conditional model: the class (index or name; a comma-separated list: one per image), or "
                        "'balanced' (image k: class k mod the number of classes)")  # fmt: skip
    p.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=None, help="classifier-free guidance w (default: the model card's)")
    p.add_argument("--priority", type=int_at_least(-(2**31), 2**31), default=None,
                   help="lower runs first (a bulk job: 5); below the server's floor for this client, the floor "
                        "(default: the server's, 0)")  # fmt: skip
    p.add_argument("--deadline", type=number_in(0.0, 86400.0, low_open=True), default=None, metavar="SECONDS",
                   help="seconds from a request's arrival by which its answer is wanted: refused at once (and retried after "
                        "its Retry-After) where the server cannot meet it; each part of a larger -n has its own "
                        "(default: none)")  # fmt: skip
    p.add_argument("-o", "--output", default="grid.png",
                   help=".png (.jpg, .webp, ...): a grid of the images; .npy: (N, C, H, W) float32 in [0, 1]; a folder (a name "
                        "ending in /, or one there): image k as NNNNNN.png, each part written as it arrives, and the same "
                        "command again asks only for the images not there; checked before the request")  # fmt: skip
    p.add_argument("--parallel", type=POSITIVE, default=1,
                   help="-o folder/: requests in flight at once (several replicas behind a balancer: one each, or more)")
    p.add_argument("--ncols", type=POSITIVE, default=None, help="grid columns (default: about the square root of n)")
    p.add_argument("--retries", type=NON_NEGATIVE, default=5,
                   help="retries of a 503 / 429 (after the server's Retry-After) or a refused connection (0.5, 1, 2 ... s apart)")
    p.add_argument("--timeout", type=POSITIVE_NUMBER, default=900.0,
                   help="seconds for the whole call (queue, denoising, retries): a stalled or trickling server is cut off")  # fmt: skip
    add_edit_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate, compiles=False)


def add_compile_cache_parser(sub: Any) -> None:
    from commands.help_format import DefaultsHelpFormatter

    text = ("build the server's compiled graphs for a model on this machine and write them to a directory "
            "(DDPM_COMPILE_CACHE_DIR), so that the next server there starts warm; the image build runs it")  # fmt: skip
    p = sub.add_parser("compile-cache", help=text, description=text, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="the model (default: DDPM_MODEL, else the shipped one)")
    p.add_argument("-o", "--output", required=True, help="the directory to write to")
    p.add_argument("--timeout", type=POSITIVE_NUMBER, default=1800.0, help="seconds the load and the compile may take")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="a directory kept between runs (the image build's cache mount): the graphs an earlier version "
                        "compiled there load instead of compiling where they did not change, and this run's copy is "
                        "left there for the next")  # fmt: skip
    p.set_defaults(func=cmd_compile_cache, compiles=False)


def cmd_compile_cache(args: argparse.Namespace) -> int:
    """The server's own start (every DDPM_* setting applies: max batch, precision, device), its
    background compile run to the end in a fresh inductor cache, and that cache copied to the output."""
    import tempfile

    from commands.output_path import writable_directory
    from ddpm.terminal_hangup import handle_unless_ignored

    writable_directory("ddpm compile-cache", "-o", args.output)  # before the minutes of compiling, not after them
    if args.reuse is not None:
        writable_directory("ddpm compile-cache", "--reuse", args.reuse)
    # this model's graphs only, in a directory removed when the command ends (what it keeps is copied to the output)
    with tempfile.TemporaryDirectory(prefix="ddpm-compile-cache-", ignore_cleanup_errors=True) as scratch:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch
        # a CI job's timeout (SIGTERM), a terminal that hung up (SIGHUP): as Ctrl-C, not a kill with no cleanup
        previous = handle_unless_ignored((signal.SIGTERM, signal.SIGHUP), _raise_terminated)  # nohup's SIGHUP stays ignored
        try:
            return _compile_into_output(args)
        except (KeyboardInterrupt, _Terminated, _Unfinished) as stop:  # a thread is inside torch: an interpreter exit aborts
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(stop, _Unfinished):
                exit_at_once(f"ddpm compile-cache: {stop}")
            if isinstance(stop, _Terminated):
                said = "terminated" if stop.signum == signal.SIGTERM else "its terminal hung up"
                exit_at_once(f"ddpm compile-cache: {said}", code=128 + stop.signum)
            exit_at_once("ddpm compile-cache: interrupted", code=130)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Terminated(Exception):
    """SIGTERM or SIGHUP, raised in the main thread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Unfinished(Exception):
    """The load or the compile ran past --timeout, its thread still inside torch."""


def _raise_terminated(signum: int, frame: object) -> None:
    if signum == signal.SIGHUP:
        from ddpm.terminal_hangup import off_the_terminal

        off_the_terminal()
    raise _Terminated(signum)


def _compile_into_output(args: argparse.Namespace) -> int:
    from ddpm import compile_cache
    from ddpm.compile_cache import artefact_path, size_bytes
    from service.api.request_log import configure_logging
    from service.server_state import ServerState
    from service.settings import Settings

    overrides: dict[str, Any] = {"compile": "auto", "compile_before_ready": False, "compile_cache_dir": Path(args.output)}
    if args.model is not None:
        overrides["model"] = args.model
    settings = Settings(**overrides)
    configure_logging(settings.log_format, "INFO")  # what was loaded, compiled and written: the build log's record
    state = ServerState(settings)
    state.reuse_compiled = () if args.reuse is None else (Path(args.reuse),)
    deadline = time.monotonic() + args.timeout  # for the load and the compile together
    state.start_loading()
    state.wait_loaded(args.timeout)
    if state.load_error is not None:
        raise SystemExit(f"ddpm compile-cache: {state.load_error}")
    if not state.ready:  # the loader thread is still inside torch: a normal exit would abort (exit 134)
        raise _Unfinished(f"the model did not load within --timeout {args.timeout:g} s")
    if state.compiler is None:
        raise SystemExit("ddpm compile-cache: nothing to compile here (torch.compile needs CUDA or a C++ compiler)")
    if not state.compiler.built.wait(max(0.0, deadline - time.monotonic())):  # the graphs, then the copy (_save_compiled)
        raise _Unfinished(f"the compile did not finish within --timeout {args.timeout:g} s")  # as above
    state.shutdown()
    failed = [group for group, path in state.hot_path_states().items() if path != "compiled"]
    if failed:
        raise SystemExit(f"ddpm compile-cache: batch sizes {', '.join(failed)} did not compile (see the log)")
    if state.compiled_key is None or not artefact_path(Path(args.output), state.compiled_key).is_dir():  # ran 68 s, said rc 0
        raise SystemExit(f"ddpm compile-cache: the compiled graphs were not written to {args.output} (see the log)")
    if args.reuse is not None:
        compile_cache.keep(artefact_path(Path(args.output), state.compiled_key), Path(args.reuse))
    written = sorted(p for p in Path(args.output).glob("compiled-*") if p.is_dir() and ".tmp" not in p.name)
    print(json.dumps({"output": args.output, "copies": [p.name for p in written], "bytes": sum(size_bytes(p) for p in written)}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """The token comes from DDPM_API_TOKEN or DDPM_API_TOKEN_FILE (never a flag: a command line is public)."""
    from tqdm import tqdm

    from commands.output_path import folder_output, writable_output, written
    from service.client import Client, ClientError, ServerError, Unreachable

    if folder_output(args.output):
        return _generate_folder(args)
    output = writable_output("ddpm generate", "-o", args.output, arrays=True, folders=True)  # before the server does the work
    assert output is not None
    # its total comes with the first progress event (image-steps: the server's chain); a request that fails stays unfilled
    bar = None if args.quiet else tqdm(total=None, unit="image-step", desc="queued", dynamic_ncols=True)
    done = False

    def on_event(name: str, data: dict[str, Any]) -> None:
        if bar is None:
            return
        if name == "queued":
            bar.set_description(f"queued ({data.get('images_ahead', 0)} images ahead)")
        elif name == "progress":
            bar.set_description("denoising")
            bar.total = data["total"]
            bar.update(data["steps_done"] - bar.n)

    on_retry = _retries_said(bar, args.retries)  # said, not silent: 5 retries of a refused connection wait 15.5 s

    chain = _request_fields(args)
    inputs = _input_files(args)  # read once, before the server is asked: a file that cannot be read is said at once
    try:
        with Client(args.url, max_retries=args.retries, timeout_s=args.timeout, on_retry=on_retry) as client:
            info = client.info() if args.n > 1 or args.resize else None
            per_request = _images_per_request(info) if args.n > 1 else None  # more: asked for in parts
            chain.update(_input_fields(inputs, _served_shape(info) if args.resize else None))
            result = client.generate(args.seed, args.n, on_event=on_event, per_request=per_request, **chain)
            done = True
    except ServerError as exc:
        raise SystemExit(f"ddpm generate: the server answered {exc.status}: {exc.detail}") from exc
    except Unreachable as exc:  # refused, reset: say where
        raise SystemExit(f"ddpm generate: {exc}") from exc
    except ClientError as exc:  # timed out, or an answer this client cannot use
        raise SystemExit(f"ddpm generate: {args.url}: {exc}") from exc
    finally:
        if bar is not None:
            if done:
                bar.set_description("done")
                if bar.total:  # an answer from the response cache has no progress events, and no total
                    bar.update(bar.total - bar.n)
            bar.close()
    written("ddpm generate", "-o", output, lambda: result.save(output, args.ncols))  # the folder may have filled up meanwhile
    meta = {k: result.meta.get(k) for k in ("model", "seed", "first_image", "batch_size", "sampler", "steps", "precision", "cached",
                                            "class_labels", "guidance_scale", "priority", "deadline_s")}  # fmt: skip
    print(json.dumps({"output": str(output), **meta}))
    return 0


def _request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request's fields from the command's flags (None: the server's default)."""
    from commands.model_commands import chain_request_fields

    if args.resize and args.init_image is None:
        raise SystemExit("ddpm generate: --resize needs --init-image")
    return {"first_image": args.first_image, **chain_request_fields(args), "priority": args.priority, "deadline_s": args.deadline}


def _generate_folder(args: argparse.Namespace) -> int:
    """-o folder/: service.generation_folder, its progress in image-steps and images written; a Ctrl-C says what is there."""
    from tqdm import tqdm

    from service.client import AsyncClient, ClientError, ServerError, Unreachable
    from service.generation_folder import FolderRefused, GenerationFolder, fill

    if args.ncols is not None:
        raise SystemExit("ddpm generate: --ncols is a grid's: -o names a folder")
    chain, inputs = _request_fields(args), _input_files(args)
    first = chain.pop("first_image") or 0
    try:
        folder = GenerationFolder.open(args.output)
        folder.request_chain(args.seed, {**chain, **{field: path for field, _, path, _ in inputs}})  # before the server is asked
    except FolderRefused as exc:
        raise SystemExit(f"ddpm generate: -o {exc}") from exc
    bar = None if args.quiet else tqdm(total=None, unit="image-step", desc="queued", dynamic_ncols=True)

    def on_event(name: str, data: dict[str, Any]) -> None:
        if bar is None:
            return
        if name == "progress":
            bar.total = data["total"]
            bar.update(data["steps_done"] - bar.n)
        elif name == "written":
            bar.set_description(f"{data['images']}/{data['of']} images")

    on_retry = _retries_said(bar, args.retries)

    async def run() -> Any:
        async with AsyncClient(args.url, max_retries=args.retries, timeout_s=args.timeout, on_retry=on_retry) as client:
            info = await client.info()
            chain.update(_input_fields(inputs, _served_shape(info) if args.resize else None))
            size = _images_per_request(info, args.parallel)
            return await fill(client, folder, args.seed, args.n, first=first, parallel=args.parallel, per_request=size,
                              on_event=on_event, info=info, **chain)  # fmt: skip

    try:
        result = asyncio.run(run())
    except KeyboardInterrupt:
        there = args.n - len(folder.missing(first, args.n))
        exit_at_once(f"\nddpm generate: interrupted: {there} of {args.n} images are in {args.output}; the same command "
                     "asks for the rest", code=130)  # fmt: skip
    except (FolderRefused, OSError) as exc:  # another model's answer; a write that failed (a full disk: the space left)
        there = args.n - len(folder.missing(first, args.n))
        said = exc if isinstance(exc, FolderRefused) else f"{args.output}: {exc}"
        raise SystemExit(f"ddpm generate: -o {said} ({there} of {args.n} images are in {args.output})") from exc
    except (ServerError, Unreachable, ClientError) as exc:
        there = args.n - len(folder.missing(first, args.n))
        said = (f"the server answered {exc.status}: {exc.detail}" if isinstance(exc, ServerError)
                else str(exc) if isinstance(exc, Unreachable) else f"{args.url}: {exc}")  # fmt: skip
        raise SystemExit(f"ddpm generate: {said} ({there} of {args.n} images are in {args.output}; the same command asks "
                         "for the rest)") from exc  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    chain_made = {k: result.meta.get(k) for k in ("model", "seed", "sampler", "steps", "precision")}
    print(json.dumps({"output": str(folder.path), "images": args.n, "written": result.written, "already_there": result.already_there,
                      "requests": result.requests, **chain_made}))  # fmt: skip
    return 0


def _retries_said(bar: Any, retries: int) -> Any:
    """``on_retry`` for the client: each retry a line above the progress bar (none with --quiet)."""
    from tqdm import tqdm

    def said(why: str, n: int, seconds: float) -> None:
        if bar is not None:
            tqdm.write(f"ddpm generate: {why}; retry {n} of {retries} in {seconds:g} s", file=sys.stderr)

    return said


def _served_shape(info: dict[str, Any] | None) -> tuple[int, int, int]:
    """The served model's (C, H, W) from GET /info (--resize fits the inputs to it)."""
    model = (info or {}).get("model")
    shape = model.get("image_shape") if isinstance(model, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise SystemExit(f"ddpm generate: --resize: the server's GET /info names no image shape ({shape!r})")
    return shape[0], shape[1], shape[2]


def _input_files(args: argparse.Namespace) -> list[tuple[str, str, str, bytes]]:
    """(request field, flag, path, bytes) of --init-image and --mask, as read."""
    files = []
    for field, flag, path in (("image", "--init-image", args.init_image), ("mask", "--mask", args.mask)):
        if path is not None:
            try:
                files.append((field, flag, path, Path(path).read_bytes()))
            except OSError as exc:
                raise SystemExit(f"ddpm generate: {exc}") from exc
    return files


def _input_fields(files: list[tuple[str, str, str, bytes]], shape: tuple[int, int, int] | None) -> dict[str, str]:
    """The inputs as the request's base64 ``image`` and ``mask`` (the server checks them), fitted to the served model's
    ``shape`` first with --resize (ddpm/input_fit.py)."""
    from commands.model_commands import fitted_input

    return {field: base64.b64encode(data if shape is None else fitted_input(data, flag, path, shape, "ddpm generate")).decode()
            for field, flag, path, data in files}  # fmt: skip


def _images_per_request(info: dict[str, Any], parallel: int = 1) -> int | None:
    """The most images one request may hold on this server (GET /info's limits): its per-request bound, or the
    queue or a client's quota where those are smaller (a larger request is refused however idle the server); with
    ``parallel`` requests in flight, the queue's and the quota's share of each (at least 1)."""
    from service.settings_check import ADMISSION_BOUNDS

    limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
    shares = {name: 1 if name == per_request else parallel
              for unit, per_request, bound, _ in ADMISSION_BOUNDS if unit == "images" for name in (per_request, bound)}  # fmt: skip
    bounds = [max(1, b // shares[k]) for k in shares if isinstance(b := limits.get(k), int) and b > 0]
    return min(bounds, default=None)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The Settings of ``ddpm serve``: its flags over the DDPM_* environment over the defaults."""
    from service.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "settings_flags", "command", "host", "port", "log_level")}
    return Settings(_cli_settings_source=args.settings_flags(parsed_args=flags))  # type: ignore[call-arg]


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ddpm.model_hub import hub_reference
    from service.settings_check import explain, unknown_variables, unreachable_bounds
    from service.tls_certificate import served_certificate

    # the settings and the model's place are checked before the server's own imports (torch among them): an operator's
    # typo is refused in ~0.5 s, not ~3.5 s (2-core EPYC)
    if args.log_level not in LOG_LEVELS:  # argparse checks a flag's choices, not a default's (DDPM_LOG_LEVEL)
        raise SystemExit(f"ddpm serve: DDPM_LOG_LEVEL / --log-level: {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SystemExit("ddpm serve: " + explain(exc).replace("\n", "\nddpm serve: ")) from exc
    except ValueError as exc:
        raise SystemExit(f"ddpm serve: {exc}") from exc
    if hub_reference(settings.model) is None and not Path(settings.model).expanduser().is_dir():
        raise SystemExit(
            f"ddpm serve: model directory not found: {settings.model} (set DDPM_MODEL or --model: a directory or a hub org/name[@revision])"
        )
    try:  # a certificate that cannot serve is refused before the model loads, naming the variable
        certificate = served_certificate(settings.tls_cert_file, settings.tls_key_file)
    except ValueError as exc:
        raise SystemExit(f"ddpm serve: {exc}") from None
    import uvicorn

    from service.accept_backoff import set_handshake_timeout
    from service.api.app import create_app
    from service.api.http_protocol import hardened_protocol
    from service.api.request_log import configure_logging
    from service.draining_server import GRACEFUL_CLOSE_S, DrainingServer
    from service.listening_socket import listening_socket
    from service.open_file_limit import quiet_accept_errors, raise_open_file_limit
    from service.server_state import ServerState

    configure_logging(settings.log_format, args.log_level)
    quiet_accept_errors()
    files = raise_open_file_limit(settings.max_connections)
    warnings = unknown_variables(os.environ, set(type(settings).model_fields)) + unreachable_bounds(settings)
    for warning in [*warnings, files] if files else warnings:
        logging.getLogger("ddpm.settings").warning(warning)
    if certificate is not None:
        logging.getLogger("ddpm.server").info(certificate.describe())
    try:
        sock, host = listening_socket(args.host, args.port)  # "::": IPv6 and IPv4 both (service.listening_socket)
    except OSError as exc:
        exit_at_once(f"ddpm serve: could not listen on [{args.host}]:{args.port}: {exc.strerror or exc}")
    state = ServerState(settings)
    if certificate is not None:
        state.metrics.watch_certificate(str(certificate.cert_file), certificate.expiry)
    try:
        app = create_app(settings, state)
    except ValueError as exc:
        raise SystemExit(f"ddpm serve: {exc}") from exc
    # uvicorn's own access log is replaced by ddpm.access (one structured line per request)
    config = uvicorn.Config(
        app,
        host=host,
        port=args.port,
        workers=1,
        loop="service.accept_backoff:new_event_loop",  # asyncio's, its accept loop stopped at the first EMFILE
        log_level=args.log_level,
        access_log=False,
        log_config=None,
        root_path=settings.root_path,  # behind a proxy's prefix: /docs fetches the schema through it
        proxy_headers=False,  # X-Forwarded-For is the project's policy (service.api.request_log.client_key), not uvicorn's
        limit_concurrency=settings.max_connections,
        http=hardened_protocol(settings.request_read_timeout_s, state.metrics.on_connection_deadline),
        timeout_keep_alive=settings.keep_alive_s,  # the idle kept-alive connection's; a new one's is the header deadline
        # by the time uvicorn shuts down, the drain has answered every job: this bounds only idle sockets
        timeout_graceful_shutdown=GRACEFUL_CLOSE_S,
    )
    if certificate is not None:  # the context uvicorn would make from the files could not be renewed: this one is followed
        config.load()
        config.ssl = certificate.context
        certificate.follow()
        set_handshake_timeout(settings.request_read_timeout_s)  # a silent TLS connection closed as a plain one is (not 60 s)
    server = DrainingServer(config, state, settings.drain_timeout_s, exit_at_once)
    try:
        server.run([sock] if sock is not None else None)
    except SystemExit:  # uvicorn's, when it cannot listen (address in use, an unknown host): it logged why
        exit_at_once(f"ddpm serve: could not listen on {args.host}:{args.port} (the error above says why)")
    if server.fatal is not None:
        exit_at_once(f"ddpm serve: {server.fatal}")
    if state.loading:  # a signal during the start: the drain had nothing to answer
        exit_at_once("ddpm serve: stopped before the model was ready", code=0)
    compiling = state.compile_thread
    if compiling is not None:  # closed by the drain: it stops at its next check, unless inside inductor or g++ now
        compiling.join(COMPILE_STOP_S)
        if compiling.is_alive():  # finalizing under it aborted (exit 134) when a SIGTERM came 8-15 s after the start
            exit_at_once("ddpm serve: stopped; the background compile was cut short", code=0)
    return 0


COMPILE_STOP_S = 5.0  # how long a stopping server waits for the compile thread to reach its next check
