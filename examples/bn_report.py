"""BatchNorm's batch under the microscope (Wu & Johnson 2021) on spp's BN-ReLU-Conv ResNet-50, with ``spp.bn``.

1. EMA: the model's running buffers after ``--ema-updates`` train-mode forwards (tracking on, PyTorch's momentum
   0.1) on Gaussian batches of ``--batch-size``, against PreciseBN population statistics of ``--num-samples``
   fresh Gaussian samples (same micro-batch size): per layer, median and worst channel.
2. Train / test: the SPP of those samples with mini-batch statistics (train mode), population statistics
   (eval mode, precise buffers) and the EMA buffers (eval mode), and |log10| of their avg_var ratios per block.
3. Normalisation batch size: for each of ``--sweep`` the mini-batch SPP over the same ``--sweep-samples`` and
   how far the micro-batches' statistics are from the population of that run.

    python examples/bn_report.py                                   # width 0.25, 64 px: about a minute on a CPU
    python examples/bn_report.py --width 0.0625 --resolution 32 --num-samples 32 --sweep 2,4 --plot /tmp/bn.png

The model is at init (no training): the EMA's error here is its initial value's weight (1 - momentum)^k plus
batch noise; in training it also mixes statistics of past weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spp import bn as sppbn
from spp.models import create_model


def _gaussian(n: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, resolution, resolution, generator=generator)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the three measurements, print them; returns the headline numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bn_relu_resnet50")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="EMA updates and PreciseBN micro-batches")
    parser.add_argument("--ema-updates", type=int, default=20)
    parser.add_argument("--momentum", type=float, default=0.1)
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--sweep", default="2,4,8,32", help="normalisation batch sizes")
    parser.add_argument("--sweep-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG: the three SPPs and the sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = create_model(args.model, width=args.width)
    layers = sppbn.batchnorm_layers(model)
    for _, bn in layers:
        bn.momentum = args.momentum
    model.train()
    with torch.no_grad():
        for _ in range(args.ema_updates):
            model(_gaussian(args.batch_size, args.resolution, gen))
    model.eval()
    print(f"{args.model} width {args.width}, {args.resolution} px, {len(layers)} BatchNorm layers; EMA: "
          f"{args.ema_updates} train-mode forwards of {args.batch_size} Gaussian samples, momentum {args.momentum} "
          f"(initial value's weight {(1 - args.momentum) ** args.ema_updates:.3f})")

    data = _gaussian(args.num_samples, args.resolution, gen)
    batches = list(data.split(args.batch_size))
    stats = sppbn.precise_bn_stats(model, batches)
    rows = sppbn.ema_discrepancy(model, stats)
    print(f"\n1. EMA buffers vs PreciseBN over {stats.samples} samples ({stats.batches} micro-batches); "
          "mean error in units of the channel's std, variance error relative; worst layers first")
    frame = sppbn.to_frame(rows)
    cols = ["layer", "channels", "mean_err_median", "mean_err_max", "var_err_median", "var_err_max"]
    print(frame[cols].head(10).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    worst = rows[0]
    print(f"worst layer {worst.layer}: mean error max {worst.mean_err_max:.4f} (channel {worst.mean_err_channel}), "
          f"variance error max {worst.var_err_max:.4f} (channel {worst.var_err_channel}); "
          f"median over layers of the median variance error {frame['var_err_median'].median():.4f}")

    tt = sppbn.train_test_spp(model, batches, stats)
    div = tt.divergence_frame()
    print("\n2. SPP avg_var per block: mini-batch (train) / population (precise, eval) / EMA (eval); |log10| ratios")
    for ra, rb, rc, (_, d) in zip(tt.minibatch.rows, tt.precise.rows, tt.ema.rows, div.iterrows(), strict=True):
        print(f"  {ra['name']:<12} {ra['avg_var']:8.4f} {rb['avg_var']:8.4f} {rc['avg_var']:8.4f}   "
              f"{d['avg_var:minibatch/precise']:.4f} {d['avg_var:minibatch/ema']:.4f} {d['avg_var:precise/ema']:.4f}")
    pairs = ("minibatch/precise", "minibatch/ema", "precise/ema")
    headline = {f"max_log10_{p}": float(div[f"avg_var:{p}"].max()) for p in pairs}
    print("max over blocks of |log10 ratio| of avg_var: "
          + ", ".join(f"{p} {headline[f'max_log10_{p}']:.4f} (x{10 ** headline[f'max_log10_{p}']:.3f})"
                      for p in pairs))

    sizes = [int(s) for s in args.sweep.split(",") if s.strip()]
    sweep = sppbn.batch_size_sweep(model, data[: args.sweep_samples], sizes, stats)
    print(f"\n3. Normalisation batch size over the same {args.sweep_samples} samples: micro-batch vs population "
          "statistics of the run (mean over layers, worst layer), and the mini-batch SPP against the SPP of the "
          "same samples with the part-1 population statistics (eval; max |log10| avg_var ratio)")
    print(f"  {'b':>4} {'samples':>8} {'var_err':>8} {'worst':>8} {'mean_err':>9} {'var_bias':>9} {'SPP div':>8}")
    for res in sweep:
        spp_div = res.spp_divergence
        mean_err = sum(r.mean_err for r in res.layers) / len(res.layers)
        bias = sum(r.var_bias for r in res.layers) / len(res.layers)
        print(f"  {res.batch_size:>4} {res.samples:>8} {res.mean_var_err:8.4f} {res.max_var_err:8.4f} "
              f"{mean_err:9.4f} {bias:9.4f} {spp_div:8.4f}")
        headline[f"var_err_b{res.batch_size}"] = res.mean_var_err
        headline[f"spp_div_b{res.batch_size}"] = spp_div
    headline.update(worst_mean_err=worst.mean_err_max, worst_var_err=worst.var_err_max)

    if args.plot is not None:
        _plot(tt, sweep, args.plot)
        print(f"\nwrote {args.plot}")
    return headline


def _plot(tt: sppbn.TrainTestSpp, sweep: list[sppbn.BatchSizeResult], path: Path) -> None:
    """The figure of `spp bn --plot` (spp.render.draw_bn): the three SPPs, their divergence, the sweep."""
    from spp import render

    path.parent.mkdir(parents=True, exist_ok=True)
    render.save_figure(render.draw_bn(tt, sweep, title="BatchNorm: train / precise / EMA"), str(path))


if __name__ == "__main__":
    main()
