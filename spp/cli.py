"""The ``spp`` command line: thin wrappers over ``spp.commands``, one function per command, of the same name.

Imports here are typer and rich only; torch loads inside a command, so ``spp --help`` and completion stay fast.
The model, block, input and compute options are declared once (``_shared``) and added to every command that
records, so ``plot``, ``record``, ``compare`` and ``blocks`` accept the same flags with the same meaning.
"""

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="spp",
    help="Signal Propagation Plots: see whether a network's signal explodes, vanishes or drifts with depth.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()

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
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.", rich_help_panel=COMPUTE)] = "cpu",
    dtype: Annotated[str, typer.Option(help="Forward dtype: float32, bfloat16 or float16 (statistics are always "
                                       "accumulated in float32 or better).", rich_help_panel=COMPUTE)] = "float32",
) -> None:
    """Template: its parameters are the input and compute options (never called)."""


def _parameters(template: Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(template, eval_str=True).parameters.values())


def _shared(*templates: Callable):
    """Add the templates' options to a command; it receives them as one RunConfig, ``cfg``.

    Also turns every SppError into one line and an exit code, so no command prints a traceback.
    """

    def decorate(fn: Callable) -> Callable:
        own = [p for p in _parameters(fn) if p.name != "cfg"]
        extra = [p for t in templates for p in _parameters(t)]
        names = [p.name for p in extra]

        @functools.wraps(fn)
        def command(**kwargs):
            with _user_errors():
                options = {n: kwargs.pop(n) for n in names}
                cfg = _config(kwargs.get("model", ""), options)
                return fn(cfg=cfg, **kwargs)

        command.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return command

    return decorate


def _config(model: str, options: dict):
    """CLI options -> RunConfig: the model flags become model keyword arguments."""
    from spp.loading import parse_kwargs
    from spp.run import RunConfig

    kwargs = parse_kwargs(options.pop("model_kwargs", None))
    for key in ("width", "in_chans", "activation", "alpha", "ws"):
        value = options.pop(key, None)
        if value is not None:
            kwargs[key] = value
    options["blocks"] = tuple(options.get("blocks") or ())
    options["channel_dim"] = tuple(options.get("channel_dim") or ())
    return RunConfig(model=model, model_kwargs=kwargs, in_chans=kwargs.get("in_chans"), **options)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn SppError (and a few OS errors) into one line and an exit code; never a traceback."""
    from spp.errors import SppError

    try:
        yield
    except SppError as exc:
        _fail(_escape(str(exc)), exc.exit_code)
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
        _fail(_escape("; ".join(nonfinite)), 3)


NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Record built-in models (the references) again instead "
                                          "of reading their curves from the cache ($SPP_CACHE_DIR).")]


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
) -> None:
    """Record a model's SPP and draw it beside the reference ResNets."""
    from spp import commands

    with _progress() as progress:
        result = commands.plot_model(cfg, out=out, table=table, reference=reference, progress=progress,
                               use_cache=not no_cache)
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
) -> None:
    """Compare SPPs of records and models: where they diverge most, per block and per stage; one figure."""
    from spp import commands

    with _progress() as progress:
        result = commands.compare_sources(sources, cfg, labels=label, out=out, table=table, x=x, align=align,
                                  progress=progress, use_cache=not no_cache)
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

        for name, description in commands.list_models(pattern):
            out_console.print(f"{name:<20} {description}", highlight=False, soft_wrap=True)


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
