"""`spp check`'s verdicts on the paper's reference ResNets (and a few timm models), against the verdicts theory
expects. Exits non-zero when a reference's verdict differs from the expected one.

    python examples/check_verdicts.py                       # depth 50, width 0.125, 64 px, batch 8
    python examples/check_verdicts.py --depth 600 --width 0.0625 --batch-size 4
    python examples/check_verdicts.py --timm resnet50 vit_tiny_patch16_224 convnext_atto

Expected (forward statistics at init):
  NF-ResNet, Scaled WS .............. healthy (variance 1 + k alpha^2 per stage, no mean)
  NF-ResNet without WS .............. mean_shift (the ReLU's positive mean passes through He-init weights)
  BN-ReLU-Conv, eval mode ........... variance_growth (an initialised BN in eval is an identity: geometric growth;
                                      at depth 600 the signal overflows: nonfinite, exit 3)
  BN-ReLU-Conv, train mode .......... healthy (each block adds ~(1 - 1/pi) to the variance: linear growth)
  ReLU-BN-Conv, train mode .......... healthy (linear growth, as BN-ReLU-Conv)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import spp.hooks
from spp.models import create_model
from spp.verdicts import check, exit_code, format_findings

REFERENCES = (
    # (label, family, mode, options, error kinds expected (any of the alternatives))
    ("NF-ResNet (Scaled WS)", "nf_resnet", "train", {}, [set()]),
    ("NF-ResNet (no WS)", "nf_resnet", "train", {"ws": False}, [{"mean_shift"}]),
    ("BN-ReLU-Conv, eval", "bn_relu_resnet", "eval", {}, [{"mean_shift", "variance_growth"},
                                                          {"mean_shift", "variance_growth", "nonfinite"}]),
    ("BN-ReLU-Conv, train", "bn_relu_resnet", "train", {}, [set()]),
    ("ReLU-BN-Conv, train", "relu_bn_resnet", "train", {}, [set()]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101, 152, 200, 288, 600))
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timm", nargs="*", default=[], help="timm model names to check as well (no verdict "
                        "expected; printed for reading)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution,
                    generator=torch.Generator().manual_seed(args.seed))
    failures = 0
    for label, family, mode, options, expected in REFERENCES:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model = create_model(f"{family}{args.depth}", width=args.width, **options)
        findings = check(spp.hooks.record(model, x, mode=mode))
        errors = {f.kind for f in findings if f.level == "error"}
        ok = errors in expected
        failures += not ok
        print(f"== {label} {args.depth}: exit {exit_code(findings)}, error kinds {sorted(errors) or '-'} "
              f"({'as expected' if ok else f'EXPECTED {[sorted(e) for e in expected]}'}; "
              f"{time.perf_counter() - start:.1f} s)")
        print(format_findings(findings))
    for name in args.timm:
        import timm

        torch.manual_seed(args.seed)
        kwargs = {"img_size": args.resolution} if "vit" in name or "deit" in name else {}
        model = timm.create_model(name, pretrained=False, **kwargs)
        findings = check(spp.hooks.record(model, x, mode="train"))
        print(f"== timm {name}: exit {exit_code(findings)}")
        print(format_findings(findings))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
