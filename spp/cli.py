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


def _no_type_hint_on_flags() -> None:
    """typer shows a ``<bool>`` type beside on/off flags (``--no-ws <bool>``, ``--help <bool>``), which reads as if
    the flag took a value: show no type for flags. Options that take a value keep theirs."""
    try:
        from typer.core import TyperOption
    except ImportError:  # another typer: its own help, whatever it shows
        return
    original = TyperOption.display_type_rich
    if getattr(original, "_spp", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._spp = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_type_hint_on_flags()

MODEL, BLOCKS, INPUT, COMPUTE = "Model", "Blocks", "Input", "Compute"

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", show_default=False, rich_help_panel=MODEL,
    help="A built-in name (spp models), timm:NAME (or a bare timm name), torchvision:NAME, FILE.py:FACTORY, "
         "a TorchScript or torch.export file, or a pickled module (with --trust-pickle). Options of a built-in "
         "can follow a '?', as in 'nf_resnet50?ws=false'.")]
LabelOpt = Annotated[str | None, typer.Option(
    "--label", "-l", show_default=False,
    help="The model's name in the legend, title, summary and table (default: the spec and its options, e.g. "
         "'nf_resnet600 (ws=False)').")]
XOpt = Annotated[str | None, typer.Option(
    "--x", show_default=False, help="x axis: block (block or layer index) or relative (block / last block); "
                                    "default: relative when the curves' depths differ, else block.")]


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
    norm: Annotated[str | None, typer.Option(
        help="Normalisation of bn_relu_resnet / relu_bn_resnet models: bn, gn, ln, in or none (default bn).",
        show_default=False, rich_help_panel=MODEL)] = None,
    groups: Annotated[int | None, typer.Option(
        help="GroupNorm groups with --norm gn (default 32).", show_default=False, rich_help_panel=MODEL)] = None,
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

    A command's own ``--label`` (a single one: ``plot``, ``record``, ``bn``) goes into the RunConfig too. Runs the
    command in a ``_session``: one reporter for its warnings and progress, every SppError as one line.
    """

    def decorate(fn: Callable) -> Callable:
        own = [p for p in _parameters(fn) if p.name != "cfg" and p.kind != inspect.Parameter.VAR_KEYWORD]
        own += [p for t in passed for p in _parameters(t)]
        extra = [p for t in templates for p in _parameters(t)]
        names = [p.name for p in extra]
        single_label = any(p.name == "label" and p.annotation == LabelOpt for p in own)

        @functools.wraps(fn)
        def command(**kwargs):
            with _session():
                options = {n: kwargs.pop(n) for n in names}
                if single_label:  # the model's own name; compare's --label names several curves instead
                    options["label"] = kwargs.pop("label")
                cfg = _config(kwargs.get("model") or "", options)
                return fn(cfg=cfg, **kwargs)

        command.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return command

    return decorate


MODEL_FLAGS = ("width", "in_chans", "activation", "alpha", "ws", "norm", "groups")  # they become model_kwargs


def _config(model: str, options: dict):
    """CLI options -> RunConfig: the model flags become model keyword arguments. Every value is checked here,
    before any work (``spp.validate`` through RunConfig, and the model's own options for a built-in model)."""
    from spp.errors import SppError
    from spp.loading import check_model_spec, parse_kwargs
    from spp.run import RunConfig
    from spp.validate import finite_number, whole_number

    kwargs = parse_kwargs(options.pop("model_kwargs", None))
    for key in MODEL_FLAGS:
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


_REPORTER: list = []  # the reporter of the command running now (one per command; a list to stay a constant)


@contextlib.contextmanager
def _session() -> Iterator:
    """One command's reporter (``spp.report``: warnings one line each, deduplicated; progress) around the
    one-line error handling. Python warnings raised by the command go to the reporter."""
    from spp.report import Reporter

    reporter = Reporter(console)
    _REPORTER.append(reporter)
    try:
        with _user_errors(), reporter.capture_warnings():
            yield reporter
    finally:
        _REPORTER.remove(reporter)


def _reporter():
    from spp.report import Reporter

    return _REPORTER[-1] if _REPORTER else Reporter(console)


def _progress():
    """The progress of every recording of the command (``spp.run.Progress``)."""
    return _reporter().progress()


def _warn(messages) -> None:
    for w in messages:
        _reporter().warn(w)


def _note(messages) -> None:
    for n in messages:
        _reporter().note(n)


def _table(title: str, columns: list[str], *, left: tuple[str, ...] = ()):
    """A rich table whose cells fold (wrap inside the cell) instead of being cut with '…' on a narrow terminal."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", pad_edge=False, collapse_padding=True)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right", overflow="fold")
    return table


def _print_summary(rec, title: str | None = None) -> None:
    table = _table(title or f"{rec.label}: {rec.num_blocks} tap points",
                   ["stage", "blocks", "first var", "last var", "max sq mean", "mean res var", "NaN/Inf ch."])
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
    table: Annotated[str | None, typer.Option(
        help="Every curve's statistics, a 'model' column naming the curve: .csv, .parquet or .json (default: next "
             "to the figure, .csv).", show_default=False)] = None,
    reference: Annotated[str | None, typer.Option(
        help="Comma-separated references (families bn_relu_resnet, relu_bn_resnet, nf_resnet, preln_transformer, "
             "postln_transformer, nf_transformer, or names like nf_resnet50), or none (default: the three "
             "families of the model's kind at the closest depth).", show_default=False)] = None,
    x: XOpt = None,
    label: LabelOpt = None,
    no_cache: NoCacheOpt = False,
    force: ForceOpt = False,
) -> None:
    """Record a model's SPP and draw it beside the reference models, recorded on the same inputs."""
    from spp import commands

    with _progress() as progress:
        result = commands.plot_model(cfg, out=out, table=table, reference=reference, x=x, progress=progress,
                                     use_cache=not no_cache, force=force)
    _warn(result.notes)
    _print_summary(result.record)
    for ref in result.references:
        from spp.render import reference_label

        _print_summary(ref, title=f"reference {reference_label(ref, result.record.settings.get('mode'))}")
    _note(result.figure_notes)
    console.print(f"x axis: {'relative depth' if result.x == 'relative' else 'block index'}; wrote {result.figure} "
                  f"and {result.table}", highlight=False, soft_wrap=True)
    _finish([], result.nonfinite)


@app.command()
@_shared(_model_options, _input_options)
def record(
    cfg,
    model: ModelOpt,
    out: Annotated[str, typer.Option("--out", "-o", help="Record file: .pt, .json, .parquet or .csv.",
                                     show_default=False)],
    label: LabelOpt = None,
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
        "--label", "-l", help="Curve name, repeatable, in argument order (default: file stem, or the model spec "
                              "and its options).", show_default=False)] = None,
    out: Annotated[str, typer.Option(
        "--out", "-o", help="Figure: .png, .svg or .pdf (three panels, curves overlaid).")] = "compare.png",
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
    _note(result.figure_notes)
    written = " and ".join(str(p) for p in (result.figure, result.table) if p is not None)
    console.print(f"{result.x_note}; wrote {written}", highlight=False, soft_wrap=True)


@app.command()
@_shared(_model_options)
def blocks(
    cfg,
    model: ModelOpt,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Record one micro-batch of two samples (Gaussian or random tokens) to prove "
        "each tap's channel axis and check its residual identity; --no-verify only lists the taps.")] = True,
) -> None:
    """Show the blocks spp finds, their stage, where the residual branch is read, the rule that found them and,
    from one micro-batch, the channel axis and whether output == shortcut + branch held (the check column)."""
    from spp import commands

    taps = commands.list_blocks(cfg)
    checks = commands.check_blocks(cfg) if verify else {}
    notes: list[str] = []
    columns = ["#", "stage", "name", "output", "residual branch", *(["axis", "check"] if verify else []), "rule"]
    table = _table(f"{model}: {len(taps) - 1} tap points after the stem", columns,
                   left=("name", "output", "residual branch", "rule"))
    for i, t in enumerate(taps):
        found = checks.get(t.name)
        note = found.note if found is not None and found.note else t.note
        mark = ""
        if note:
            if note not in notes:
                notes.append(note)
            mark = f" [yellow]\\[note {notes.index(note) + 1}][/]"
        verdict = []
        if verify:
            check = found.check if found is not None else "not recorded"
            colour = {"verified": "green", "refused": "red"}.get(check, "yellow")
            verdict = [str(found.axis) if found is not None and found.axis >= 0 else "-",
                       f"[{colour}]{_escape(check)}[/]" if check != "-" else "-"]
        table.add_row(str(i), str(t.stage), _escape(t.name), _escape(_relative(str(t.output), t.module)),
                      _escape(_relative(str(t.residual or "-"), t.module)), *verdict, _escape(t.rule) + mark)
    out_console.print(table)
    for n, note in enumerate(notes, start=1):
        out_console.print(f"[yellow]note {n}:[/] {_escape(note)}", highlight=False, soft_wrap=True)


@app.command()
@_shared(_model_options)
def bn(
    cfg,
    model: ModelOpt,
    input: Annotated[str | None, typer.Option(
        "--input", "-i", help="The data: images (folder, glob or file) or a .pt / .npy tensor (N, C, H, W); default "
        "Gaussian N(0, 1).", show_default=False, rich_help_panel=INPUT)] = None,
    batch_size: Annotated[str, typer.Option(
        help="Normalisation batch size: one (32), or several (32,2,4,8): the first is PreciseBN's micro-batch and "
             "the train/test SPPs'; several are swept over the same samples.", rich_help_panel=INPUT)] = "32",
    num_samples: Annotated[int | None, typer.Option(
        help="Samples (default: every sample of a file, images up to 256; Gaussian: 4 micro-batches of the largest "
             "batch size).", show_default=False, rich_help_panel=INPUT)] = None,
    resolution: Annotated[int | None, typer.Option(
        help="Image height and width (default: 128, or a timm model's own).", show_default=False,
        rich_help_panel=INPUT)] = None,
    input_std: Annotated[float, typer.Option(help="Std of the Gaussian input.", rich_help_panel=INPUT)] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the model's init and of Gaussian inputs.",
                                      rich_help_panel=INPUT)] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.", rich_help_panel=COMPUTE)] = "cpu",
    table: Annotated[str | None, typer.Option(
        help="Per BatchNorm layer, EMA buffers vs precise statistics: .csv, .parquet or .json.",
        show_default=False)] = None,
    precise_out: Annotated[str | None, typer.Option(
        help="Write the state_dict with precise running statistics here (.pt; torch.load(weights_only=True) reads "
             "it). The model and its checkpoint are never changed.", show_default=False)] = None,
    plot: Annotated[str | None, typer.Option(
        help="Figure: the train / precise / EMA SPPs and their divergence per block (and the batch-size sweep): "
             ".png, .svg or .pdf.", show_default=False)] = None,
    sync_bn: Annotated[bool, typer.Option(
        "--sync-bn", help="Under torchrun: BatchNorm becomes SyncBatchNorm for the run, so the normalisation batch "
                          "spans the ranks (restored after).")] = False,
    label: LabelOpt = None,  # _shared puts it into cfg
) -> None:
    """PreciseBN on real data: each BatchNorm's EMA buffers against the exact population statistics, and the SPP
    with mini-batch, population and EMA statistics (train/test inconsistency), per normalisation batch size."""
    from dataclasses import replace

    from spp import commands

    sizes = commands.parse_batch_sizes(batch_size)
    cfg = replace(cfg, input=input, batch_size=sizes[0], num_samples=num_samples, resolution=resolution,
                  input_std=input_std, seed=seed, device=device)
    with _progress() as progress:
        result = commands.bn_report(cfg, batch_sizes=sizes, table=table, precise_out=precise_out, plot=plot,
                                    sync_bn=sync_bn, progress=progress)
    _warn(result.notes)
    _print_bn(result)


def _print_bn(result) -> None:
    stats = result.stats
    out_console.print(f"{result.label}: {len(stats.layers)} BatchNorm layers; {result.inputs}", highlight=False,
                      soft_wrap=True)
    out_console.print(result.normalisation, highlight=False, soft_wrap=True)
    rows = result.discrepancy
    if rows:
        table = _table(f"EMA buffers vs PreciseBN (population statistics of {stats.samples} samples), worst first; "
                       "mean error in units of the channel's std, variance error relative",
                       ["layer", "channels", "mean err median", "mean err max", "var err median", "var err max",
                        "EMA updates"], left=("layer",))
        for r in rows[: commands_top()]:
            table.add_row(_escape(r.layer), str(r.channels), f"{r.mean_err_median:.3g}", f"{r.mean_err_max:.3g}",
                          f"{r.var_err_median:.3g}", f"{r.var_err_max:.3g}",
                          str(r.num_batches_tracked) if r.num_batches_tracked >= 0 else "-")
        out_console.print(table)
        if len(rows) > commands_top():
            more = f"; all {len(rows)} in {result.table}" if result.table else "; --table FILE writes all of them"
            out_console.print(f"{len(rows) - commands_top()} more layers{more}", highlight=False, soft_wrap=True)
    table = _table("train/test inconsistency: SPP variance with mini-batch (train), population (precise) and EMA "
                   "statistics, |log10| ratio (0.3 = x2)", ["pair", "max over blocks", "at block", "mean"],
                   left=("pair", "at block"))
    for d in result.divergence():
        table.add_row(d["pair"].replace("minibatch", "mini-batch"), _num(d["max_log10"], ".3g"),
                      f"{d['block']} ({_escape(str(d['name']))})", _num(d["mean_log10"], ".3g"))
    out_console.print(table)
    if result.sweep:
        table = _table("normalisation batch size: mini-batch vs population statistics of the same samples",
                       ["batch", "samples", "var err (mean over layers)", "var err (worst layer)",
                        "SPP vs population (max |log10|)"])
        for res in result.sweep:
            table.add_row(str(res.batch_size), str(res.samples), f"{res.mean_var_err:.3g}", f"{res.max_var_err:.3g}",
                          _num(res.spp_divergence, ".3g"))
        out_console.print(table)
    written = [str(p) for p in (result.table, result.precise_out, result.figure) if p is not None]
    if written:
        console.print("wrote " + ", ".join(written), highlight=False, soft_wrap=True)


def commands_top() -> int:
    from spp.commands import BN_TOP

    return BN_TOP


@app.command()
def models(pattern: Annotated[str | None, typer.Argument(help="fnmatch filter, e.g. 'nf_*'.")] = None) -> None:
    """List the built-in reference models."""
    with _session():
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
    """A site relative to its block, so the table stays readable: "layer1.0.conv3:output" of block "layer1.0" is
    "conv3:output", the block's own "layer1.0:input" is "input". Only a leading block name is removed (block "2"'s
    site "2.ln2:input" is "ln2:input", not "lninput")."""
    if not block:
        return site
    if site.startswith(f"{block}."):
        return site[len(block) + 1:]
    if site.startswith(f"{block}:"):
        return site[len(block) + 1:]
    return site


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
    comp = result.comparison
    first = comp.labels[0]
    out_console.print(comp.alignment_note, highlight=False, soft_wrap=True)
    if comp.identical:
        out_console.print(f"every record equals {first} exactly at every aligned block", highlight=False,
                          soft_wrap=True)
    div = comp.divergence
    for stat, heading in _STAT_NAMES.items():
        rows = div[div["statistic"] == stat]
        table = _table(f"{heading}: largest divergence from {first}",
                       ["vs", "block", "name", "stage", first, "other", f"other/{first}", "log10"], left=("vs", "name"))
        for r in rows.itertuples():
            table.add_row(_escape(r.label), str(r.block), _escape(r.name), str(r.stage), f"{r.first:.4g}",
                          f"{r.other:.4g}", *_ratio_text(r.log10_ratio))
        out_console.print(table)
    table = _table(f"per stage: geometric-mean ratio to {first}",
                   ["stage", "blocks", "vs", *_STAT_NAMES.values(), "max |log10|"], left=("vs",))
    for r in comp.stages.to_dict("records"):
        table.add_row("stem" if r["stage"] == 0 else str(r["stage"]), r["blocks"], _escape(r["label"]),
                      *(_num(r[f"{s}_ratio"]) for s in _STAT_NAMES), _num(r["max_abs_log10_ratio"], ".2f"))
    out_console.print(table)


def main() -> None:
    import os

    if os.environ.get("RANK", "0").strip() not in ("", "0"):  # under torchrun only rank 0 prints (and writes)
        console.quiet = out_console.quiet = True
    app(prog_name="spp")


if __name__ == "__main__":
    main()
