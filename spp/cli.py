"""The ``spp`` command line: thin wrappers over ``spp.commands``.

Imports here are typer and rich only; torch loads inside a command, so ``spp --help`` and completion stay fast.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Optional

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

MODEL_PANEL = "Model"
INPUT_PANEL = "Input"
BLOCKS_PANEL = "Blocks"

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name (see `spp models`).",
                                       rich_help_panel=MODEL_PANEL)]
WidthOpt = Annotated[Optional[float], typer.Option(help="Channel multiplier for built-in models.",
                                                   rich_help_panel=MODEL_PANEL)]
InChansOpt = Annotated[Optional[int], typer.Option(help="Input channels.", rich_help_panel=MODEL_PANEL)]
ActivationOpt = Annotated[Optional[str], typer.Option(help="Activation for built-in models (relu, silu, gelu, tanh, "
                                                      "identity, ...).", rich_help_panel=MODEL_PANEL)]
AlphaOpt = Annotated[Optional[float], typer.Option(help="alpha of nf_resnet models.", rich_help_panel=MODEL_PANEL)]
WsOpt = Annotated[Optional[bool], typer.Option("--ws/--no-ws", help="Scaled WS in nf_resnet models (--no-ws: "
                                               "plain He-init convs, the paper's mean-shift ablation).",
                                               rich_help_panel=MODEL_PANEL, show_default=False)]
ModelKwargsOpt = Annotated[Optional[str], typer.Option(help="Extra model keyword arguments as JSON.",
                                                       rich_help_panel=MODEL_PANEL)]
BlocksOpt = Annotated[Optional[list[str]], typer.Option("--blocks", help="fnmatch pattern on module names that "
                                                        "picks the blocks (repeatable).", rich_help_panel=BLOCKS_PANEL)]
ResidualTapOpt = Annotated[Optional[str], typer.Option(help="Child of each block whose output is the residual branch.",
                                                       rich_help_panel=BLOCKS_PANEL)]
ChannelDimOpt = Annotated[Optional[int], typer.Option(help="Channel axis of the activations (default: 1, or -1 for "
                                                      "(B, N, C) tokens).", rich_help_panel=BLOCKS_PANEL)]
BatchSizeOpt = Annotated[int, typer.Option(help="Micro-batch size: the normalisation batch of BN in train mode.",
                                           rich_help_panel=INPUT_PANEL)]
NumSamplesOpt = Annotated[Optional[int], typer.Option(help="Total samples, in micro-batches, aggregated exactly "
                                                      "[default: one micro-batch].", rich_help_panel=INPUT_PANEL)]
ResolutionOpt = Annotated[Optional[int], typer.Option(help="Input height and width [default: 128, or the model's].",
                                                      rich_help_panel=INPUT_PANEL)]
SeedOpt = Annotated[int, typer.Option(help="Seed for the model's init and the Gaussian inputs.",
                                      rich_help_panel=INPUT_PANEL)]
InputStdOpt = Annotated[float, typer.Option(help="Std of the Gaussian input.", rich_help_panel=INPUT_PANEL)]
ModeOpt = Annotated[str, typer.Option(help="train: BN uses batch statistics (buffers untouched); eval: running stats.",
                                      rich_help_panel=INPUT_PANEL)]


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn SppError (and a few OS errors) into one line and an exit code; never a traceback."""
    from spp.errors import SppError

    try:
        yield
    except SppError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (OSError, MemoryError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", 1)


def _model_kwargs(width, in_chans, activation, alpha, ws, model_kwargs) -> dict:
    from spp.loading import parse_kwargs

    kwargs = parse_kwargs(model_kwargs)
    for key, value in (("width", width), ("in_chans", in_chans), ("activation", activation), ("alpha", alpha),
                       ("ws", ws)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def _config(**kw):
    from spp.run import RunConfig

    kwargs = _model_kwargs(kw.pop("width"), kw.pop("in_chans"), kw.pop("activation"), kw.pop("alpha"), kw.pop("ws"),
                           kw.pop("model_kwargs"))
    blocks = tuple(kw.pop("blocks") or ())
    return RunConfig(model_kwargs=kwargs, blocks=blocks, in_chans=kwargs.get("in_chans"), **kw)


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


@app.command()
def plot(
    model: ModelOpt,
    out: Annotated[str, typer.Option("--out", "-o", help="Figure file: .png, .svg or .pdf.")] = "spp.png",
    table: Annotated[Optional[str], typer.Option(help="Statistics table: .csv, .parquet or .json "
                                                 "[default: next to the figure, .csv].")] = None,
    reference: Annotated[Optional[str], typer.Option(
        help="Comma-separated references (bn_relu_resnet, relu_bn_resnet, nf_resnet, or names like nf_resnet50), "
             "or 'none' [default: the three families at the closest depth].")] = None,
    batch_size: BatchSizeOpt = 8,
    num_samples: NumSamplesOpt = None,
    resolution: ResolutionOpt = None,
    seed: SeedOpt = 0,
    input_std: InputStdOpt = 1.0,
    mode: ModeOpt = "train",
    width: WidthOpt = None,
    in_chans: InChansOpt = None,
    activation: ActivationOpt = None,
    alpha: AlphaOpt = None,
    ws: WsOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    blocks: BlocksOpt = None,
    residual_tap: ResidualTapOpt = None,
    channel_dim: ChannelDimOpt = None,
) -> None:
    """Record a model's SPP and draw it beside the reference ResNets."""
    with _user_errors():
        from spp import commands

        cfg = _config(model=model, batch_size=batch_size, num_samples=num_samples, resolution=resolution, seed=seed,
                      input_std=input_std, mode=mode, width=width, in_chans=in_chans, activation=activation,
                      alpha=alpha, ws=ws, model_kwargs=model_kwargs, blocks=blocks, residual_tap=residual_tap,
                      channel_dim=channel_dim)
        with _progress() as progress:
            result = commands.plot(cfg, out=out, table=table, reference=reference, progress=progress)
        _print_summary(result.record)
        for ref in result.references:
            _print_summary(ref, title=f"reference {ref.label}")
        console.print(f"wrote {result.figure} and {result.table}", highlight=False)
        for w in result.warnings:
            _fail(w, 3)


@app.command()
def models(pattern: Annotated[Optional[str], typer.Argument(help="fnmatch filter, e.g. 'nf_*'.")] = None) -> None:
    """List the built-in reference models."""
    with _user_errors():
        from spp import commands

        for name, description in commands.models(pattern):
            out_console.print(f"{name:<20} {description}", highlight=False)


@app.command()
def blocks(
    model: ModelOpt,
    width: WidthOpt = None,
    in_chans: InChansOpt = None,
    activation: ActivationOpt = None,
    alpha: AlphaOpt = None,
    ws: WsOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    blocks: BlocksOpt = None,
    residual_tap: ResidualTapOpt = None,
    channel_dim: ChannelDimOpt = None,
) -> None:
    """Show the blocks spp finds, their stage, where the residual branch is read, and the rule that found them."""
    with _user_errors():
        from rich.table import Table

        from spp import commands

        cfg = _config(model=model, width=width, in_chans=in_chans, activation=activation, alpha=alpha, ws=ws,
                      model_kwargs=model_kwargs, blocks=blocks, residual_tap=residual_tap, channel_dim=channel_dim)
        taps = commands.blocks(cfg)
        table = Table(title=f"{model}: {len(taps) - 1} tap points after the stem", title_justify="left")
        for col in ("#", "stage", "name", "output", "residual branch", "rule"):
            table.add_column(col)
        for i, t in enumerate(taps):
            table.add_row(str(i), str(t.stage), t.name, str(t.output), str(t.residual or "-"),
                          t.rule + (f" [yellow]({t.note})[/]" if t.note else ""))
        out_console.print(table)


def main() -> None:
    app(prog_name="spp")


if __name__ == "__main__":
    sys.exit(main())
