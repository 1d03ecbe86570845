"""The ``spp`` command line: thin wrappers over ``spp.commands``, one function per command, of the same name.

Imports here are typer and rich only; torch loads inside a command, so ``spp --help`` and completion stay fast.
The model, block, input and compute options are declared once (``_shared``) and added to every command that
records, so ``plot``, ``record``, ``compare`` and ``blocks`` accept the same flags with the same meaning.
"""

import contextlib
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from typer.core import TyperGroup

# typer 0.29 vendors click as typer._click (its exceptions are not click's); older typer uses click itself.
_click_errors: Any = importlib.import_module(
    getattr(getattr(typer.core, "_click", None), "__name__", "click") + ".exceptions")


class _OneLineErrors(TyperGroup):
    """Usage errors (a value typer cannot parse, an unknown option, a missing argument) as one ``error:`` line and
    exit code 2, like spp's own errors, instead of click's boxed usage text."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _click_errors.NoArgsIsHelpError as exc:  # `spp` alone: typer has printed the help already
            sys.exit(exc.exit_code)
        except _click_errors.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "spp"
            _print_error(f"{exc.format_message()} (see {command} --help)")
            sys.exit(exc.exit_code)
        except _click_errors.ClickException as exc:
            _print_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="spp",
    help="Signal Propagation Plots: see whether a network's signal explodes, vanishes or drifts with depth.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)
console = Console(stderr=True)
out_console = Console()
error_console = Console(stderr=True)  # never quieted: under torchrun every rank says why it failed

MODEL, BLOCKS, INPUT, COMPUTE = "Model", "Blocks", "Input", "Compute"

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", show_default=False, rich_help_panel=MODEL,
    help="A built-in name (`spp models`), timm:NAME (or a bare timm name), torchvision:NAME, path/to/file.py:factory, "
         "a TorchScript / torch.export file, or a pickled module (with --trust-pickle). Built-in options can follow "
         "a '?': 'nf_resnet600?ws=false,alpha=0.3'.")]


def _model_options(
    width: Annotated[float | None, typer.Option(help="Channel multiplier of built-in models.",
                                                rich_help_panel=MODEL)] = None,
    in_chans: Annotated[int | None, typer.Option(help="Input channels.", rich_help_panel=MODEL)] = None,
    activation: Annotated[str | None, typer.Option(
        help="Activation of built-in models: relu, silu, gelu, tanh, identity, ...", rich_help_panel=MODEL)] = None,
    alpha: Annotated[float | None, typer.Option(help="alpha of nf_resnet models (default 0.2).",
                                                rich_help_panel=MODEL)] = None,
    ws: Annotated[bool | None, typer.Option(
        "--ws/--no-ws", show_default=False, rich_help_panel=MODEL,
        help="Scaled WS in nf_resnet models (--no-ws: plain He-init convs, the paper's mean-shift ablation).")] = None,
    model_kwargs: Annotated[str | None, typer.Option(help="More model keyword arguments, as a JSON object.",
                                                     rich_help_panel=MODEL)] = None,
    pretrained: Annotated[bool, typer.Option(help="Load pretrained weights (timm / torchvision).",
                                             rich_help_panel=MODEL)] = False,
    checkpoint: Annotated[str | None, typer.Option(help="A state_dict to load on top of the architecture "
                                                   "(weights_only).", rich_help_panel=MODEL)] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow loading pickled modules, which can run code: only for "
                                               "files you trust.", rich_help_panel=MODEL)] = False,
    blocks: Annotated[list[str] | None, typer.Option(
        "--blocks", help="fnmatch pattern on module names picking the blocks (repeatable).",
        rich_help_panel=BLOCKS)] = None,
    residual_tap: Annotated[str | None, typer.Option(help="Child of each block whose output is the residual branch.",
                                                     rich_help_panel=BLOCKS)] = None,
    channel_dim: Annotated[list[str] | None, typer.Option(
        "--channel-dim", help="Channel axis where spp cannot prove it from the layers: AXIS for every tap, or "
        "PATTERN=AXIS per tap name (fnmatch), repeatable: --channel-dim 'stages.0.*=1'.", rich_help_panel=BLOCKS,
        show_default=False)] = None,
) -> None:
    """Template: its parameters are the model and block options (never called)."""


def _input_options(
    input: Annotated[str | None, typer.Option(
        "--input", "-i", help="Images (folder, glob or file), or a .pt / .npy tensor of shape (N, C, H, W); for "
        "token models: tokens (random ids), embeddings (Gaussian inputs_embeds), a .txt file (the model's tokenizer), "
        "or a .pt / .npy of ids (N, L). Default: Gaussian N(0, 1) images, or tokens.", rich_help_panel=INPUT)] = None,
    seq_len: Annotated[int | None, typer.Option(
        help="Tokens per sequence for token models (default: 128, or what the model requires).", show_default=False,
        rich_help_panel=INPUT)] = None,
    input_std: Annotated[float, typer.Option(help="Std of the Gaussian input.", rich_help_panel=INPUT)] = 1.0,
    num_samples: Annotated[int | None, typer.Option(
        help="Total samples, in micro-batches, aggregated exactly (default: one micro-batch of noise; every "
             "sample of a file).", show_default=False, rich_help_panel=INPUT)] = None,
    batch_size: Annotated[int, typer.Option(help="Micro-batch size: the normalisation batch of BN in train mode.",
                                            rich_help_panel=INPUT)] = 8,
    resolution: Annotated[int | None, typer.Option(
        help="Input height and width (default: 128, or a timm model's own).", show_default=False,
        rich_help_panel=INPUT)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the model's init and of the Gaussian inputs.",
                                      rich_help_panel=INPUT)] = 0,
    mode: Annotated[str, typer.Option(help="train: normalisation layers use batch statistics (buffers untouched), "
                                      "dropout off; eval: running statistics.", rich_help_panel=INPUT)] = "train",
    stochastic: Annotated[bool, typer.Option(
        "--stochastic", help="Keep dropout, drop-path and stochastic depth live (default: off, so the SPP is "
        "deterministic).", rich_help_panel=INPUT)] = False,
    grad: Annotated[bool, typer.Option(
        "--grad", help="Also back-propagate a loss and record the gradient's statistics at every tap (columns "
        "grad_avg_sq_mean, grad_avg_var, grad_res_avg_var; a second row of panels in the figure).",
        rich_help_panel=INPUT)] = False,
    loss: Annotated[str, typer.Option(
        help="The loss of --grad: random (sum(output * g), g ~ N(0, 1) drawn from --seed) or xent (cross-entropy "
        "of a classifier's (batch, classes) output against random labels). Both sum over the batch.",
        rich_help_panel=INPUT)] = "random",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.", rich_help_panel=COMPUTE)] = "cpu",
    dtype: Annotated[str, typer.Option(help="Forward dtype: float32, bfloat16 or float16 (statistics are always "
                                       "accumulated in float32 or better).", rich_help_panel=COMPUTE)] = "float32",
) -> None:
    """Template: its parameters are the input and compute options (never called)."""


def _parameters(template: Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(template, eval_str=True).parameters.values())


def _shared(*templates: Callable, passed: Sequence[Callable] = ()):
    """Add the templates' options to a command; it receives them as one RunConfig, ``cfg``. The options of the
    ``passed`` templates are added too and reach the command as keyword arguments (its ``**kwargs``).

    Also turns every SppError into one line and an exit code, so no command prints a traceback.
    """

    def decorate(fn: Callable) -> Callable:
        own = [p for p in _parameters(fn) if p.name != "cfg" and p.kind != inspect.Parameter.VAR_KEYWORD]
        own += [p for t in passed for p in _parameters(t)]
        extra = [p for t in templates for p in _parameters(t)]
        names = [p.name for p in extra]

        @functools.wraps(fn)
        def command(**kwargs):
            with _user_errors():
                options = {n: kwargs.pop(n) for n in names}
                cfg = _config(kwargs.get("model") or "", options)
                return fn(cfg=cfg, **kwargs)

        command.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return command

    return decorate


def _config(model: str, options: dict):
    """CLI options -> RunConfig: the model flags become model keyword arguments. Every value is checked here,
    before any work (``spp.validate`` through RunConfig, and the model's own options for a built-in model)."""
    from spp.errors import SppError
    from spp.loading import check_model_spec, parse_kwargs
    from spp.run import RunConfig
    from spp.validate import finite_number, whole_number

    kwargs = parse_kwargs(options.pop("model_kwargs", None))
    for key in ("width", "in_chans", "activation", "alpha", "ws"):
        value = options.pop(key, None)
        if value is not None:
            if key in kwargs:
                raise SppError(f"--{key.replace('_', '-')} and --model-kwargs both set {key!r}; give it once")
            kwargs[key] = value
    if "width" in kwargs and isinstance(kwargs["width"], float):
        finite_number(kwargs["width"], "--width", positive=True)
    if "alpha" in kwargs and isinstance(kwargs["alpha"], float):
        finite_number(kwargs["alpha"], "--alpha", minimum=0.0)
    if "in_chans" in kwargs:
        whole_number(kwargs["in_chans"], "--in-chans", minimum=1)
    options["blocks"] = tuple(options.get("blocks") or ())
    options["channel_dim"] = tuple(options.get("channel_dim") or ())
    cfg = RunConfig(model=model, model_kwargs=kwargs, in_chans=kwargs.get("in_chans"), **options)
    if model:
        check_model_spec(model, kwargs)
    return cfg


def _print_error(message: str) -> None:
    """One ``error:`` line on stderr, on every rank (prefixed with the rank under torchrun)."""
    rank = os.environ.get("RANK", "").strip()
    prefix = f"rank {rank}: " if rank not in ("", "0") and not message.startswith(f"rank {rank}:") else ""
    error_console.print(f"[bold red]error:[/] {prefix}{_escape(message)}", highlight=False, soft_wrap=True,
                        markup=True)


def _fail(message: str, code: int = 2, *, every_rank: bool = True) -> None:
    """Print ``error: message`` and exit with ``code``: on every rank for an error (each says why it stopped), on
    rank 0 only for a result such as NaN/Inf in the activations (``every_rank=False``)."""
    target = error_console if every_rank else console
    target.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn SppError (and a few OS errors) into one line and an exit code; never a traceback."""
    from spp.errors import SppError

    try:
        yield
    except SppError as exc:
        rank = os.environ.get("RANK", "").strip()
        text = str(exc) if rank in ("", "0") or str(exc).startswith(f"rank {rank}:") else f"rank {rank}: {exc}"
        _fail(_escape(text), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (OSError, MemoryError) as exc:
        _fail(_escape(f"{type(exc).__name__}: {exc}"), 1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@contextlib.contextmanager
def _progress() -> Iterator[Callable]:
    """A rich progress bar shared by every recording of a command (one task per model)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False, disable=not console.is_terminal)

    @contextlib.contextmanager
    def task(label: str, total: int):
        tid = bar.add_task(label, total=total)
        yield lambda n: bar.advance(tid, 1)
        bar.update(tid, completed=total)

    with bar:
        yield task


def _warn(messages) -> None:
    for w in messages:
        console.print(f"[yellow]warning:[/] {_escape(w)}", highlight=False, soft_wrap=True)


def _print_summary(rec, title: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=title or f"{rec.label}: {rec.num_blocks} blocks", title_justify="left")
    for col in ("stage", "blocks", "first var", "last var", "max sq mean", "mean res var", "NaN/Inf ch."):
        table.add_column(col, justify="right")
    stem = rec.rows[0]
    table.add_row("stem", "0", f"{stem['avg_var']:.4g}", f"{stem['avg_var']:.4g}", f"{stem['avg_sq_mean']:.4g}", "-",
                  str(stem["nonfinite"]))
    for s in rec.stage_summary():
        table.add_row(str(s["stage"]), s["blocks"], f"{s['first_var']:.4g}", f"{s['last_var']:.4g}",
                      f"{s['max_sq_mean']:.4g}", f"{s['mean_res_var']:.4g}",
                      f"[red]{s['nonfinite']}[/]" if s["nonfinite"] else "0")
    out_console.print(table)


def _finish(notes: list[str], nonfinite: list[str]) -> None:
    """Notes are printed as warnings; NaN/Inf in the activations end the command with exit code 3 after the files
    are written, so scripts notice without losing the table that shows where it happened."""
    _warn(notes)
    if nonfinite:
        _fail(_escape("; ".join(nonfinite)), 3, every_rank=False)


NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Record built-in models (the references) again instead "
                                          "of reading their curves from the cache ($SPP_CACHE_DIR).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Let the table replace a file that is an spp record or not a "
                                        "table spp wrote (refused otherwise).")]


@app.command()
@_shared(_model_options, _input_options)
def plot(
    cfg,
    model: ModelOpt,
    out: Annotated[str, typer.Option("--out", "-o", help="Figure file: .png, .svg or .pdf.")] = "spp.png",
    table: Annotated[str | None, typer.Option(help="Statistics table: .csv, .parquet or .json (default: next to the "
                                              "figure, .csv).", show_default=False)] = None,
    reference: Annotated[str | None, typer.Option(
        help="Comma-separated references (bn_relu_resnet, relu_bn_resnet, nf_resnet, or names like nf_resnet50), "
             "or 'none' (default: the three families at the depth closest to the model's).", show_default=False)
    ] = None,
    no_cache: NoCacheOpt = False,
    force: ForceOpt = False,
) -> None:
    """Record a model's SPP and draw it beside the reference ResNets."""
    from spp import commands

    with _progress() as progress:
        result = commands.plot_model(cfg, out=out, table=table, reference=reference, progress=progress,
                               use_cache=not no_cache, force=force)
    _print_summary(result.record)
    for ref in result.references:
        _print_summary(ref, title=f"reference {ref.label}")
    console.print(f"wrote {result.figure} and {result.table}", highlight=False)
    _finish(result.notes, result.nonfinite)


@app.command()
@_shared(_model_options, _input_options)
def record(
    cfg,
    model: ModelOpt,
    out: Annotated[str, typer.Option("--out", "-o", help="Record file: .pt, .json, .parquet or .csv.",
                                     show_default=False)],
) -> None:
    """Record a model's SPP to a file, for `spp compare` or a notebook (spp.load_record)."""
    from spp import commands

    with _progress() as progress:
        result = commands.record_to_file(cfg, out=out, progress=progress)
    _print_summary(result.record)
    console.print(f"wrote {result.path} ({result.record.num_blocks} blocks)", highlight=False)
    _finish(result.notes, result.nonfinite)


@app.command()
@_shared(_model_options, _input_options)
def compare(
    cfg,
    sources: Annotated[list[str], typer.Argument(
        help="Two or more record files (.pt, .json, .parquet, .csv) or model specs (anything --model takes, "
             "recorded now with the options below); the first is the baseline.", show_default=False)],
    label: Annotated[list[str] | None, typer.Option(
        "--label", "-l", help="Curve name, repeatable, in argument order (default: file stem or model "
                              "name).", show_default=False)] = None,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="Figure: .png, .svg or .pdf (three panels, curves overlaid).")] = None,
    table: Annotated[str | None, typer.Option(
        help="Aligned comparison table: .csv, .parquet or .json.")] = None,
    x: Annotated[str | None, typer.Option(
        "--x", help="x axis of the figure: block or relative (default: block when block counts are equal, "
                    "else relative).", show_default=False)] = None,
    align: Annotated[str, typer.Option(help="auto: by tap name when all names match, else by relative depth "
                                       "(interpolated); or name, or relative.")] = "auto",
    no_cache: NoCacheOpt = False,
    force: ForceOpt = False,
) -> None:
    """Compare SPPs of records and models: where they diverge most, per block and per stage; one figure."""
    from spp import commands

    with _progress() as progress:
        result = commands.compare_sources(sources, cfg, labels=label, out=out, table=table, x=x, align=align,
                                  progress=progress, use_cache=not no_cache, force=force)
    _warn(result.warnings)
    _print_comparison(result)
    if result.figure is not None:
        console.print(f"{result.x_note}; wrote {result.figure}", highlight=False, soft_wrap=True)
    if result.table is not None:
        console.print(f"wrote {result.table}", highlight=False)


@app.command()
@_shared(_model_options)
def blocks(cfg, model: ModelOpt) -> None:
    """Show the blocks spp finds, their stage, where the residual branch is read, and the rule that found them."""
    from rich.table import Table

    from spp import commands

    taps = commands.list_blocks(cfg)
    table = Table(title=f"{model}: {len(taps) - 1} tap points after the stem", title_justify="left")
    for col in ("#", "stage", "name", "output", "residual branch", "rule"):
        table.add_column(col, overflow="fold")
    for i, t in enumerate(taps):
        table.add_row(str(i), str(t.stage), t.name, _relative(str(t.output), t.module),
                      _relative(str(t.residual or "-"), t.module),
                      _escape(t.rule) + (f" [yellow]({_escape(t.note)})[/]" if t.note else ""))
    out_console.print(table)


@app.command()
def models(pattern: Annotated[str | None, typer.Argument(help="fnmatch filter, e.g. 'nf_*'.")] = None) -> None:
    """List the built-in reference models."""
    with _user_errors():
        from spp import commands
        from spp.errors import SppError

        found = commands.list_models(pattern)
        if not found:
            raise SppError(f"no built-in model matches {pattern!r}; `spp models` lists them all (names like "
                           "nf_resnet50, bn_relu_resnet600, preln_transformer12)")
        for name, description in found:
            out_console.print(f"{name:<20} {description}", highlight=False, soft_wrap=True)


THRESHOLDS = "Thresholds"
_THRESHOLD_HELP = {
    "max_mean_ratio": "mu^2 / sigma^2 above which a block has a mean shift (default 1: |mean| = std).",
    "max_growth": "Largest accepted change of the stream's variance between blocks, as a factor (default: the "
                  "linear bound 1 + n over n blocks, where the growth is geometric).",
    "max_branch_exponent": "p in res_avg_var ~ avg_var ** p above which growth is geometric (default 0.5).",
    "min_shape_growth": "Variance change within a run below which the exponent is not fitted (default 2).",
    "max_branch_ratio": "Variance a branch adds / the stream's variance above which it dominates (default 1).",
    "zero_branch_ratio": "Branch / stream variance below which a branch is negligible (default 2**-18).",
    "min_added_variance": "Least relative variance growth for the mean-shift increment test (default 0.01).",
    "max_grad_growth": "Largest accepted change of the gradient's second moment between blocks (default 1 + n).",
}


def _threshold_options(
    thresholds: Annotated[str | None, typer.Option(
        "--thresholds", help="TOML file of thresholds: field names of spp.verdicts.Thresholds, top level or under "
        "[thresholds]; options below override it.", show_default=False, rich_help_panel=THRESHOLDS)] = None,
    max_mean_ratio: Annotated[float | None, typer.Option(help=_THRESHOLD_HELP["max_mean_ratio"],
                                                         show_default=False, rich_help_panel=THRESHOLDS)] = None,
    max_growth: Annotated[float | None, typer.Option(help=_THRESHOLD_HELP["max_growth"], show_default=False,
                                                     rich_help_panel=THRESHOLDS)] = None,
    max_branch_exponent: Annotated[float | None, typer.Option(
        help=_THRESHOLD_HELP["max_branch_exponent"], show_default=False, rich_help_panel=THRESHOLDS)] = None,
    min_shape_growth: Annotated[float | None, typer.Option(help=_THRESHOLD_HELP["min_shape_growth"],
                                                           show_default=False, rich_help_panel=THRESHOLDS)] = None,
    max_branch_ratio: Annotated[float | None, typer.Option(help=_THRESHOLD_HELP["max_branch_ratio"],
                                                           show_default=False, rich_help_panel=THRESHOLDS)] = None,
    zero_branch_ratio: Annotated[float | None, typer.Option(help=_THRESHOLD_HELP["zero_branch_ratio"],
                                                            show_default=False, rich_help_panel=THRESHOLDS)] = None,
    min_added_variance: Annotated[float | None, typer.Option(
        help=_THRESHOLD_HELP["min_added_variance"], show_default=False, rich_help_panel=THRESHOLDS)] = None,
    max_grad_growth: Annotated[float | None, typer.Option(help=_THRESHOLD_HELP["max_grad_growth"],
                                                          show_default=False, rich_help_panel=THRESHOLDS)] = None,
) -> None:
    """Template: the threshold options of `spp check` (never called)."""


@app.command()
@_shared(_model_options, _input_options, passed=[_threshold_options])
def check(
    cfg,
    record_file: Annotated[str | None, typer.Argument(
        metavar="[RECORD]", help="A saved record (.pt, .json, .parquet, .csv; `spp record`) to check instead of "
        "recording --model.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", show_default=False, rich_help_panel=MODEL,
        help="The model to record and check: anything `spp plot --model` takes.")] = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Also write the verdicts as JSON (schema spp.check/1: findings with kind, level, blocks, "
        "value, threshold, message; healthy) to FILE.json, or - for stdout (the table then goes to stderr).",
        show_default=False)] = None,
    **thresholds: Any,
) -> None:
    """Verdicts on a model's SPP for CI: mean shift, variance growth or collapse, zero or dominant branches,
    NaN/Inf. Exit code 0 healthy, 1 findings at error level, 2 usage error, 3 NaN/Inf."""
    import json

    from spp import commands

    limits = commands.load_thresholds(thresholds.pop("thresholds", None), **thresholds)
    with _progress() as progress:
        result = commands.check_source(cfg if model else None, record=record_file, thresholds=limits,
                                       json_out=json_out, progress=progress)
    _print_findings(result, console if json_out == "-" else out_console)
    if json_out == "-":  # through out_console: under torchrun only rank 0 prints it
        out_console.print(json.dumps(result.to_json(), indent=1, allow_nan=False), markup=False, highlight=False,
                          soft_wrap=True, emoji=False)
    elif result.json_path is not None:
        console.print(f"wrote {result.json_path}", highlight=False)
    _warn(result.notes)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


_LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "note": "cyan"}


def _blocks_text(blocks: tuple[int, int]) -> str:
    first, last = blocks
    return str(first) if first == last else f"{first}-{last}"


def _print_findings(result, target: Console) -> None:
    """A rich table on a terminal; plain lines when piped (one finding per line, greppable in CI logs)."""
    from rich.table import Table

    from spp.verdicts import format_findings

    rec, findings = result.record, result.findings
    counts = {level: sum(f.level == level for f in findings) for level in ("error", "warning", "note")}
    verdict = "healthy" if result.exit_code == 0 else "NaN/Inf" if result.exit_code == 3 else "unhealthy"
    summary = (f"spp check {rec.label} ({rec.num_blocks} blocks): {verdict}; {counts['error']} error(s), "
               f"{counts['warning']} warning(s), {counts['note']} note(s); exit {result.exit_code}")
    if not target.is_terminal:
        target.print(format_findings(findings), highlight=False, soft_wrap=True, markup=False)
        target.print(summary, highlight=False, soft_wrap=True, markup=False)
        return
    table = Table(title=summary, title_justify="left")
    for col, justify in (("level", "left"), ("kind", "left"), ("blocks", "right"), ("value", "right"),
                         ("threshold", "right"), ("what it means", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for f in findings:
        table.add_row(f"[{_LEVEL_STYLE[f.level]}]{f.level}[/]", f.kind, _blocks_text(f.blocks), _num(f.value, ".4g"),
                      _num(f.threshold, ".4g"), _escape(f.message))
    target.print(table)


@app.command()
def gamma(
    activations: Annotated[list[str], typer.Argument(
        metavar="ACT...", help="Activations: built-in names (relu, gelu, silu, ...), any torch.nn.functional or "
        "torch function by name, or an expression in x such as 'x * torch.sigmoid(1.702*x)'.", show_default=False)],
) -> None:
    """gamma = 1 / std(g(x)) for x ~ N(0, 1), by quadrature, with the closed form where one exists and
    DeepMind's / timm's tabulated constant beside it; also E[g(x)] (what Scaled WS removes) and E[g(x)^2]."""
    with _user_errors():
        from rich.table import Table

        from spp.models.activations import describe_gamma, format_gamma_table

        reports = describe_gamma(list(activations))
        if not out_console.is_terminal:
            typer.echo(format_gamma_table(reports))
            return
        table = Table(title="gamma = 1 / std(g(x)), x ~ N(0, 1)", title_justify="left")
        for col in ("activation", "gamma", "closed form", "table (DeepMind/timm)", "table - gamma", "z", "E[g]",
                    "E[g^2]"):
            table.add_column(col, justify="left" if col == "activation" else "right", overflow="fold")

        def num(v: float | None, fmt: str = ".6f") -> str:
            return "-" if v is None else format(v, fmt)

        for r in reports:
            table.add_row(_escape(r.spec), num(r.gamma), num(r.closed_form), num(r.table_value, ".4f"),
                          num(r.table_difference, "+.6f"), num(r.table_z, "+.1f"), num(r.mean), num(r.second_moment))
        out_console.print(table)


def _relative(site: str, block: str) -> str:
    """Site names relative to their block ("conv3:output"), so the table stays readable."""
    if not block:
        return site
    return site.replace(f"{block}.", "").replace(f"{block}:", "")


_STAT_NAMES = {"avg_sq_mean": "avg squared mean", "avg_var": "avg variance",
               "res_avg_var": "residual avg variance"}


def _ratio_text(log10_ratio: float) -> tuple[str, str]:
    """(other / first, its log10) for the divergence tables; inf where one side is zero or NaN."""
    import math

    if math.isnan(log10_ratio):
        return "-", "-"
    if math.isinf(log10_ratio):
        return ("inf" if log10_ratio > 0 else "0"), f"{'+' if log10_ratio > 0 else '-'}inf"
    return f"{10 ** log10_ratio:.3g}", f"{log10_ratio:+.2f}"


def _num(v: float, fmt: str = ".3g") -> str:
    return "-" if v != v else format(v, fmt)  # NaN: nothing to compare (the stem has no residual branch)


def _print_comparison(result) -> None:
    from rich.table import Table

    comp = result.comparison
    first = comp.labels[0]
    out_console.print(comp.alignment_note, highlight=False, soft_wrap=True)
    if comp.identical:
        out_console.print(f"every record equals {first} exactly at every aligned block", highlight=False,
                          soft_wrap=True)
    div = comp.divergence
    for stat, heading in _STAT_NAMES.items():
        rows = div[div["statistic"] == stat]
        table = Table(title=f"{heading}: largest divergence from {first}", title_justify="left")
        for col in ("vs", "block", "name", "stage", first, "other", f"other/{first}", "log10"):
            table.add_column(col, justify="left" if col in ("vs", "name") else "right", overflow="fold")
        for r in rows.itertuples():
            table.add_row(r.label, str(r.block), r.name, str(r.stage), f"{r.first:.4g}", f"{r.other:.4g}",
                          *_ratio_text(r.log10_ratio))
        out_console.print(table)
    table = Table(title=f"per stage: geometric-mean ratio to {first}", title_justify="left")
    for col in ("stage", "blocks", "vs", *_STAT_NAMES.values(), "max |log10|"):
        table.add_column(col, justify="left" if col == "vs" else "right", overflow="fold")
    for r in comp.stages.to_dict("records"):
        table.add_row("stem" if r["stage"] == 0 else str(r["stage"]), r["blocks"], r["label"],
                      *(_num(r[f"{s}_ratio"]) for s in _STAT_NAMES), _num(r["max_abs_log10_ratio"], ".2f"))
    out_console.print(table)



def main() -> None:
    import os

    if os.environ.get("RANK", "0").strip() not in ("", "0"):  # under torchrun only rank 0 prints (and writes)
        console.quiet = out_console.quiet = True
    app(prog_name="spp")


if __name__ == "__main__":
    main()
