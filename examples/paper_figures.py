"""Reproduce Figures 1 and 2 of Brock, De & Smith (2021), "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", with spp's reference models.

* Figure 1: pre-activation ResNet-600 with BN-ReLU-Conv ordering vs ReLU-BN-Conv (BN in train mode): the
  ReLU-BN-Conv variance grows linearly with depth and resets at each stage; the mean does not stay near zero.
* Figure 2: NF-ResNet-600 with Scaled WS, without it (``ws=False``: plain He-init convs, where the ReLU's
  mean shift accumulates), beside BN-ReLU-Conv. With Scaled WS the variance follows the expected
  ``1 + k alpha^2`` within each stage (dashed line) and the mean stays small.

    python examples/paper_figures.py                       # depth 600, full width: minutes on a CPU
    python examples/paper_figures.py --depth 50 --width 0.25 --resolution 64 --batch-size 4 --out-dir /tmp/spp

Writes ``figure1.png`` and ``figure2.png`` to ``--out-dir``. Inputs are unit Gaussian, as in the paper.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spp import render
from spp.models import DEPTHS
from spp.records import Record
from spp.run import RunConfig, record_run


def _record(args: argparse.Namespace, family: str, label: str, **kwargs: object) -> Record:
    cfg = RunConfig(model=f"{family}{args.depth}", model_kwargs={"width": args.width, **kwargs},
                    resolution=args.resolution, batch_size=args.batch_size, seed=args.seed, mode="train",
                    label=label)
    rec = record_run(cfg)
    last = rec.rows[-1]
    print(f"{label:<32} final avg var {last['avg_var']:10.4g}, avg sq mean {last['avg_sq_mean']:10.4g}")
    return rec


def main(argv: list[str] | None = None) -> list[Path]:
    """Record the five networks, draw both figures; returns the PNG paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=600, choices=sorted(DEPTHS), help="ResNet depth (600).")
    parser.add_argument("--width", type=float, default=1.0, help="Channel multiplier (1.0).")
    parser.add_argument("--resolution", type=int, default=128, help="Input height and width (128).")
    parser.add_argument("--batch-size", type=int, default=8, help="Gaussian samples, one BN batch (8).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for weights and inputs (0).")
    parser.add_argument("--out-dir", default=".", help="Where the PNGs go (current folder).")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = args.depth
    size = f"{args.resolution}px, batch {args.batch_size}, width {args.width:g}"

    bn_relu = _record(args, "bn_relu_resnet", f"BN-ReLU-Conv ResNet-{d}")
    relu_bn = _record(args, "relu_bn_resnet", f"ReLU-BN-Conv ResNet-{d}")
    fig1 = render.draw([bn_relu, relu_bn], title=f"Figure 1: ResNetV2-{d} at initialisation ({size})")
    figure1 = out / "figure1.png"
    render.save_figure(fig1, str(figure1))

    nf_ws = _record(args, "nf_resnet", f"NF-ResNet-{d} (Scaled WS)", ws=True)
    nf_plain = _record(args, "nf_resnet", f"NF-ResNet-{d} (no Scaled WS)", ws=False)
    fig2 = render.draw([nf_ws, nf_plain, bn_relu],
                       title=f"Figure 2: NF-ResNet-{d} with and without Scaled WS, alpha 0.2 ({size})")
    figure2 = out / "figure2.png"
    render.save_figure(fig2, str(figure2))
    print(f"wrote {figure1} and {figure2}")
    return [figure1, figure2]


if __name__ == "__main__":
    main()
