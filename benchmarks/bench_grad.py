"""The cost of ``--grad``: ``spp.hooks.record(grad=True)`` against a forward-only ``record()``, and against what a
user's own forward + backward of the same loss costs.

Rows (same model, mode, inputs; candidates interleaved, medians and paired ratios):

* ``record()``: forward only (no graph), as without ``--grad``;
* ``record(grad=True)``: the forward with a graph, the random-projection loss and the backward to every tap
  (gradients at the sites only: no weight gradient is computed);
* ``fwd + loss.backward()``: a bare forward with a graph and ``loss.backward()`` of the same loss, parameters'
  gradients included (``.grad`` set to None after each), the cost of one training step without the optimiser.

Expected: record(grad=True) / record() about 2-3 (a backward costs one to two forwards), and below
fwd + backward (spp's backward skips the weight gradients).
"""

from __future__ import annotations

import _common
import torch


def build(name: str, width: float):
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False).eval(), "eval"
    from spp.models import create_model

    return create_model(name, width=width), "train"


def measure(name: str, res: int, width: float, batch: int, reps: int) -> list:
    import spp.hooks
    from spp.discovery import find_taps

    model, mode = build(name, width)
    label = f"{name}{f' w{width:g}' if not name.startswith('timm:') else ''} {res}px, batch {batch}"
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))
    taps = find_taps(model)
    g = None

    def forward_only():
        spp.hooks.record(model, x, mode=mode, taps=taps)

    def with_grad():
        spp.hooks.record(model, x, mode=mode, taps=taps, grad=True)

    def train_step():
        nonlocal g
        model.train(mode == "train")
        out = model(x)
        if g is None:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (out * g).sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    runs: dict[str, list[float]] = {}
    t = _common.interleaved({"record": forward_only, "grad": with_grad, "step": train_step}, reps, samples=runs)
    return [label, len(taps) - 1, t["record"] * 1e3, t["grad"] * 1e3, t["step"] * 1e3,
            _common.paired(runs, "grad", "record"), _common.paired(runs, "grad", "step")]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    _common.set_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    configs = [("nf_resnet50", 32, 0.125, 8), ("bn_relu_resnet50", 32, 0.125, 8), ("nf_resnet50", 128, 0.5, 8),
               ("timm:resnet50", 224, 1.0, 8)]
    if args.quick:
        configs = configs[:3]
    rows = [measure(name, res, width, batch, reps) for name, res, width, batch in configs]
    _common.table("Cost of --grad", ["model", "blocks", "record() ms", "record(grad=True) ms",
                                     "fwd + loss.backward() ms", "grad / forward-only (paired)",
                                     "grad / fwd+backward (paired)"], rows,
                  note=f"{_common.machine()}. {reps} rounds, candidates interleaved in rotating order; paired: "
                       "median over rounds of the ratio within a round.")


if __name__ == "__main__":
    main()
