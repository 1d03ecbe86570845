"""Every measured number in the README, from the code paths of the commands that the README shows.

    python examples/readme_numbers.py                   # the README's settings: ~10 minutes on 2 CPU cores
    python examples/readme_numbers.py --write-readme    # ... and put the sections into README.md
    python examples/readme_numbers.py --depth 50 --width 0.0625 --resolution 32 --batch-size 2 \
        --bn-width 0.0625 --bn-resolution 32 --bn-samples 16 --bn-batch-sizes 8,2,4,16 --ema-updates 3 \
        --hf-spec "hf:gpt2?n_layer=2,n_embd=32,n_head=2" --tf-depths 6,12 --tf-width 32 --seq-len 16   # tiny

Each section is printed between ``<!-- readme_numbers:NAME -->`` and ``<!-- /readme_numbers:NAME -->`` lines,
with the command that made it; README.md holds the same lines, and ``--write-readme`` replaces them there. The
sections: ``how-to-read`` (``spp plot --model nf_resnet600``: the model and its two BN references),
``norms`` (``spp plot --model bn_relu_resnet50 --norm ...``), ``compare`` (``spp compare nf_resnet600
'nf_resnet600?ws=false'``), ``blocks`` (``spp blocks`` on five library models), ``bn`` (``spp bn`` on a
checkpoint whose BatchNorm buffers took 20 EMA updates), ``transformers`` (``spp plot --model hf:gpt2`` and the
reference transformers at 12 and 48 layers) and ``gradients`` (``spp plot --model nf_resnet50 --grad``). Each
calls the library function behind its command (``spp.commands``), so the numbers are those the commands print.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from spp import commands
from spp.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "examples/readme_numbers.py"
DEFAULTS = {"depth": 600, "width": None, "resolution": None, "batch_size": None, "bn_width": 0.25,
            "bn_resolution": 64, "bn_samples": 512, "bn_batch_sizes": "32,2,4,8", "ema_updates": 20,
            "hf_spec": "hf:gpt2", "tf_depths": "12,48", "tf_width": None, "seq_len": None}
SHORT = {"bn_relu_resnet": "BN-ReLU-Conv", "relu_bn_resnet": "ReLU-BN-Conv", "nf_resnet": "NF-ResNet, Scaled WS",
         "preln_transformer": "Pre-LN transformer", "postln_transformer": "Post-LN transformer",
         "nf_transformer": "NF transformer"}
NORM_DEPTH = 50  # the norms table: ResNet-50 (with no norm, 600 layers overflow float32)


def g(v: float, digits: int = 3) -> str:
    """``digits`` significant digits, in plain notation up to 1e6 (3440, not 3.44e+03)."""
    import math

    if v and math.isfinite(v) and 10 ** (digits - 1) <= abs(v) < 1e6:
        return f"{round(v, digits - 1 - math.floor(math.log10(abs(v)))):.0f}"
    return f"{v:.{digits}g}"


def command_line(args: argparse.Namespace) -> str:
    """The script's command with the flags that differ from the defaults (printed in every section)."""
    flags = []
    for key, default in DEFAULTS.items():
        value = getattr(args, key)
        if value != default:
            flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join([f"python {SCRIPT}", *flags])


def section(name: str, args: argparse.Namespace, body: list[str]) -> str:
    return "\n".join([f"<!-- readme_numbers:{name} -->", *body, "",
                      f"<sub>Numbers: `{command_line(args)}` (section `{name}`).</sub>",
                      f"<!-- /readme_numbers:{name} -->"])


def model_kwargs(args: argparse.Namespace, **extra) -> dict:
    return {**({"width": args.width} if args.width is not None else {}), **extra}


def run_config(args: argparse.Namespace, model: str, **extra) -> RunConfig:
    return RunConfig(model=model, model_kwargs=model_kwargs(args, **extra), resolution=args.resolution,
                     batch_size=args.batch_size or 8)


def how_to_read(args: argparse.Namespace, out: Path) -> str:
    """`spp plot --model nf_resnet600`: per stage, the variance of its first and last block; per stage the mean
    residual variance; the largest squared mean."""
    result = commands.plot_model(run_config(args, f"nf_resnet{args.depth}"), out=str(out / "spp.png"))
    records = {"BN-ReLU-Conv": result.references[0], "ReLU-BN-Conv": result.references[1],
               "NF-ResNet, Scaled WS": result.record}
    s = result.record.settings
    shape = "x".join(map(str, s["input_shape"]))
    body = [f"`spp plot --model nf_resnet{args.depth}` ({s['samples']} Gaussian samples of {shape}, train mode, "
            f"seed {s['seed']}); per stage, the variance of its first and last block:", "",
            f"| model ({args.depth} layers) | stage 1 | stage 2 | stage 3 | stage 4 | residual variance per stage "
            "| squared mean, least … most |", "|---|---|---|---|---|---|---|"]
    for label, rec in records.items():
        stages = rec.stage_summary()
        cells = [f"{g(st['first_var'])} → {g(st['last_var'])}" for st in stages]
        res = " / ".join(g(st["mean_res_var"]) for st in stages)
        squared = [r["avg_sq_mean"] for r in rec.rows[1:]]
        body.append(f"| {label} | {' | '.join(cells)} | {res} | {g(min(squared))} … {g(max(squared))} |")
    return section("how-to-read", args, body)


def norms(args: argparse.Namespace, out: Path) -> str:
    """`spp plot --model bn_relu_resnet50 --norm N --reference none` for each norm: per stage the mean residual
    variance, and avg_var + avg_sq_mean at each stage's last block (the total power)."""
    rows = []
    for norm in ("bn", "gn", "ln", "in"):
        cfg = run_config(args, f"bn_relu_resnet{NORM_DEPTH}", norm=norm)
        if (cfg.resolution or 128) < 64:  # GroupNorm's 32 groups need maps of 2x2 or more in the last stage
            cfg = RunConfig(**{**cfg.__dict__, "resolution": 64})
        result = commands.plot_model(cfg, out=str(out / f"norm_{norm}.png"), reference="none")
        rows.append((norm, result.record))
    s = rows[0][1].settings
    body = [f"`spp plot --model bn_relu_resnet{NORM_DEPTH} --norm NORM --reference none` ({s['samples']} Gaussian "
            f"samples of {'x'.join(map(str, s['input_shape']))}): per stage, the mean residual variance and, at "
            "the stage's last block k, the total power avg_var + avg_sq_mean (k + 1 in theory):", "",
            "| norm | residual variance per stage | total power at the stage ends | largest squared mean |",
            "|---|---|---|---|"]
    for norm, rec in rows:
        stages = rec.stage_summary()
        ends = [rec.rows[e] for e in rec.stage_ends]
        power = " / ".join(g(r["avg_var"] + r["avg_sq_mean"]) for r in ends)
        res = " / ".join(g(st["mean_res_var"]) for st in stages)
        top = max(r["avg_sq_mean"] for r in rec.rows[1:])
        body.append(f"| {norm} | {res} | {power} | {g(top)} |")
    return section("norms", args, body)


def compare(args: argparse.Namespace, out: Path) -> str:
    """`spp compare nf_resnet600 'nf_resnet600?ws=false'`: where the squared mean diverges most, per stage."""
    name = f"nf_resnet{args.depth}"
    result = commands.compare_sources([name, f"{name}?ws=false"], run_config(args, name), out=str(out / "c.png"))
    comp = result.comparison
    div = comp.divergence
    top = div[(div["statistic"] == "avg_sq_mean") & (div["rank"] == 1)].iloc[0]
    stages = comp.stages[comp.stages["stage"] > 0]
    ratios = " / ".join(f"{g(v)}x" for v in stages["avg_sq_mean_ratio"])
    var = " / ".join(f"{g(v)}x" for v in stages["avg_var_ratio"])
    body = [f"For `{name}` against `{name} --no-ws` the squared mean diverges most at block {int(top['block'])} "
            f"({g(top['first'])} → {g(top['other'], 4)}, log10 {top['log10_ratio']:+.2f}); per stage it is "
            f"{ratios} larger without Scaled WS (geometric means over the stage's blocks), the variance "
            f"{var}."]
    return section("compare", args, body)


def blocks(args: argparse.Namespace) -> str:
    """`spp blocks` on five library models, randomly initialised: tap points found."""
    counts = {}
    for spec in ("timm:resnet50", "timm:nf_resnet50", "convnext_atto", "vit_tiny_patch16_224", "torchvision:resnet18"):
        counts[spec] = len(commands.list_blocks(RunConfig(model=spec))) - 1
    body = [f"Tap points `spp blocks` finds on randomly initialised models: timm `resnet50` {counts['timm:resnet50']}, "
            f"timm `nf_resnet50` {counts['timm:nf_resnet50']}, `convnext_atto` {counts['convnext_atto']}, "
            f"`vit_tiny_patch16_224` {counts['vit_tiny_patch16_224']} (two per block: attention and MLP), "
            f"torchvision `resnet18` {counts['torchvision:resnet18']}."]
    return section("blocks", args, body)


def transformers(args: argparse.Namespace, out: Path) -> str:
    """`spp plot --model hf:gpt2` (its default token input) and `spp plot --model preln_transformerL` for each of
    ``--tf-depths``: first and last residual-stream variance of each reference transformer beside its derived
    theory, and the HF model's stem, last stream and mean branch variances."""
    extra = {"width": args.tf_width} if args.tf_width else {}
    hf = commands.plot_model(RunConfig(model=args.hf_spec, seq_len=args.seq_len, batch_size=args.batch_size or 8),
                             out=str(out / "hf.png"))
    rec = hf.record
    branch = {b: sum(r["res_avg_var"] for r in rec.rows if r["branch"] == b) / sum(r["branch"] == b for r in rec.rows)
              for b in ("attn", "mlp")}
    body = [f"`spp plot --model {args.hf_spec}` ({rec.settings['samples']} sequences of {rec.settings['seq_len']} "
            f"random token ids, train mode): {len(rec.rows) - 1} tap points, the residual-stream variance "
            f"{g(rec.rows[0]['avg_var'])} at the embeddings and {g(rec.rows[-1]['avg_var'])} after the last layer, "
            f"the branch variance {g(branch['attn'])} (attention) and {g(branch['mlp'])} (MLP) on average; the "
            "references beside it, and the same families at other depths: the stream variance after the first "
            "attention and after the last MLP, measured, beside the theory (over infinitely many sequences) and the "
            "theory as a batch of that many sequences reads it (`at_batch`: low by the part every token of a "
            "sequence shares, divided by the batch), and that shared part's share of the last variance:", "",
            "| reference | layers | first: measured (theory) | last: measured | last: theory | last: theory at "
            "the batch | shared part |", "|---|---|---|---|---|---|---|"]
    from spp.models import create_model

    for depth in [int(d) for d in args.tf_depths.split(",")]:
        cfg = RunConfig(model=f"preln_transformer{depth}", model_kwargs=extra, seq_len=args.seq_len,
                        batch_size=args.batch_size or 8)
        result = commands.plot_model(cfg, out=str(out / f"tf{depth}.png"))
        for ref in [result.record, *result.references]:
            family = ref.settings.get("family") or "preln_transformer"
            theory = create_model(f"{family}{depth}", **extra, seq_len=ref.settings["seq_len"]).spp_theory[-1]
            first, last = ref.rows[1], ref.rows[-1]
            body.append(f"| {SHORT[family]} | {depth} | {g(first['avg_var'])} ({g(first['expected_var'])}) | "
                        f"{g(last['avg_var'])} | {g(theory.var)} | {g(theory.at_batch(ref.settings['samples'])[0])} "
                        f"| {g(theory.common / theory.var, 2)} |")
    return section("transformers", args, body)


def gradients(args: argparse.Namespace, out: Path) -> str:
    """`spp plot --model nf_resnet50 --grad`: the gradient variance at the last block and at the stem, per model."""
    cfg = replace(run_config(args, f"nf_resnet{NORM_DEPTH}"), grad=True)
    result = commands.plot_model(cfg, out=str(out / "grad.png"))
    body = [f"`spp plot --model nf_resnet{NORM_DEPTH} --grad` (loss: a seeded random projection of the output): "
            "the gradient's average channel variance at the last block and at the stem, and their ratio:", "",
            "| model | last block | stem | stem / last |", "|---|---|---|---|"]
    for rec in [*result.references, result.record]:
        last, stem = rec.rows[-1]["grad_avg_var"], rec.rows[0]["grad_avg_var"]
        body.append(f"| {SHORT[rec.settings.get('family') or 'nf_resnet']} | {g(last)} | {g(stem)} | "
                    f"{g(stem / last)} |")
    return section("gradients", args, body)


def ema_checkpoint(args: argparse.Namespace, path: Path) -> None:
    """The README's checkpoint: bn_relu_resnet50 (seed 0) after ``ema_updates`` train-mode forwards of 32
    Gaussian samples (PyTorch's momentum 0.1), as the README's Python block writes it."""
    torch.manual_seed(0)
    from spp.models import create_model

    model = create_model("bn_relu_resnet50", width=args.bn_width)
    model.train()
    with torch.no_grad():
        for _ in range(args.ema_updates):
            model(torch.randn(32, 3, args.bn_resolution, args.bn_resolution))
    torch.save(model.state_dict(), path)


def bn(args: argparse.Namespace, out: Path) -> str:
    """`spp bn` on that checkpoint: the worst layer, the train/test divergence, the batch-size sweep."""
    ckpt = out / "ema20.pt"
    ema_checkpoint(args, ckpt)
    cfg = RunConfig(model="bn_relu_resnet50", model_kwargs={"width": args.bn_width}, checkpoint=str(ckpt),
                    resolution=args.bn_resolution, num_samples=args.bn_samples)
    result = commands.bn_report(cfg, batch_sizes=args.bn_batch_sizes)
    worst = result.discrepancy[0]
    median = sorted(r.var_err_median for r in result.discrepancy)[len(result.discrepancy) // 2]
    div = {d["pair"]: d for d in result.divergence()}
    body = [f"On that checkpoint ({result.inputs}): {len(result.stats.layers)} BatchNorm layers; the worst, "
            f"`{worst.layer}`, has EMA buffers off the population by {g(worst.mean_err_max)} channel standard "
            f"deviations in the mean and {g(100 * worst.var_err_max)} % in the variance (worst channels); the median "
            f"layer's median channel is off by {g(100 * median)} % in the variance. The SPP variance with "
            f"mini-batch vs population statistics differs by up to a factor "
            f"{g(10 ** div['minibatch/precise']['max_log10'])} (block {div['minibatch/precise']['block']}), "
            f"population vs EMA by {g(10 ** div['precise/ema']['max_log10'])} "
            f"(block {div['precise/ema']['block']}).", "",
            "| normalisation batch | mini-batch vs population variance, mean over layers (worst layer) | SPP "
            "variance vs population, largest factor |", "|---|---|---|"]
    for res in result.sweep:
        body.append(f"| {res.batch_size} | {g(100 * res.mean_var_err)} % ({g(100 * res.max_var_err)} %) | "
                    f"{g(10 ** res.spp_divergence)} |")
    return section("bn", args, body)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"], help="NF-ResNet depth (600, or 50)")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (default: the models')")
    parser.add_argument("--resolution", type=int, default=None, help="default: spp's 128")
    parser.add_argument("--batch-size", type=int, default=None, help="default: spp's 8")
    parser.add_argument("--bn-width", type=float, default=DEFAULTS["bn_width"])
    parser.add_argument("--bn-resolution", type=int, default=DEFAULTS["bn_resolution"])
    parser.add_argument("--bn-samples", type=int, default=DEFAULTS["bn_samples"])
    parser.add_argument("--bn-batch-sizes", default=DEFAULTS["bn_batch_sizes"])
    parser.add_argument("--ema-updates", type=int, default=DEFAULTS["ema_updates"])
    parser.add_argument("--hf-spec", default=DEFAULTS["hf_spec"], help="the HF model of `transformers`")
    parser.add_argument("--tf-depths", default=DEFAULTS["tf_depths"], help="reference transformer depths")
    parser.add_argument("--tf-width", type=int, default=None, help="reference transformer width (default 256)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: spp's 128)")
    parser.add_argument("--only", default=None, help="comma list of sections")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--write-readme", action="store_true", help="replace the sections in README.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.only.split(",")) if args.only else None
    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        makers = {"how-to-read": lambda: how_to_read(args, out), "norms": lambda: norms(args, out),
                  "compare": lambda: compare(args, out), "blocks": lambda: blocks(args), "bn": lambda: bn(args, out),
                  "transformers": lambda: transformers(args, out), "gradients": lambda: gradients(args, out)}
        for name, make in makers.items():
            if wanted is None or name in wanted:
                sections[name] = make()
                print(sections[name], "\n", flush=True)
    if args.write_readme:
        write_readme(sections, ROOT / "README.md")
    return sections


def readme_sections(text: str) -> dict[str, str]:
    """The ``readme_numbers`` sections of a README text, markers included, by name."""
    found = re.finditer(r"<!-- readme_numbers:([\w-]+) -->.*?<!-- /readme_numbers:\1 -->", text, flags=re.S)
    return {m.group(1): m.group(0) for m in found}


def write_readme(sections: dict[str, str], path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    present = readme_sections(text)
    missing = [name for name in sections if name not in present]
    if missing:
        sys.exit(f"README.md has no section {', '.join(missing)}: add its marker lines first")
    for name, body in sections.items():
        text = text.replace(present[name], body)
    path.write_text(text, encoding="utf-8")
    print(f"updated {', '.join(sections)} in {path}")


if __name__ == "__main__":
    main()
