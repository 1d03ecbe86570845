"""Build time and forward time of the 600-layer references (what ``spp plot`` pays per model), optionally against
an older revision of ``spp/models/layers.py`` (``--baseline REV``, read with ``git show``), each build in a fresh
process, interleaved."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _common


def child(name: str, baseline_file: str | None, res: int) -> dict:
    import torch

    if baseline_file:
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_layers", baseline_file)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        import spp.models.layers as layers
        import spp.models.nf_resnet as nf
        import spp.models.resnet as resnet

        for mod in (layers, nf, resnet):
            for attr in ("ScaledStdConv2d", "he_conv"):
                if hasattr(mod, attr):
                    setattr(mod, attr, getattr(old, attr))
    from spp.models import create_model

    torch.manual_seed(0)
    t = time.perf_counter()
    model = create_model(name)
    build = time.perf_counter() - t
    x = torch.randn(8, 3, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        model(x)
        forward = time.perf_counter() - t
    return {"build": build, "forward": forward}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None, help="git revision whose spp/models/layers.py is the 'before'")
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    names = ["nf_resnet600"] if args.quick else ["nf_resnet600", "bn_relu_resnet600", "relu_bn_resnet600"]
    with tempfile.TemporaryDirectory() as tmp:
        baseline_file = None
        if args.baseline:
            baseline_file = os.path.join(tmp, "layers_baseline.py")
            src = subprocess.run(["git", "show", f"{args.baseline}:spp/models/layers.py"], cwd=_common.ROOT,
                                 capture_output=True, text=True, check=True).stdout
            with open(baseline_file, "w") as f:
                f.write(src)
        rows = []
        for name in names:
            runs: dict[str, list[dict]] = {"now": [], "before": []}
            for _ in range(reps):
                for label, base in (("now", None), ("before", baseline_file)):
                    if label == "before" and base is None:
                        continue
                    runs[label].append(_common.run_json([__file__, "--child", json.dumps([name, base,
                                                                                          args.resolution])]))
            now = {k: statistics.median(r[k] for r in runs["now"]) for k in ("build", "forward")}
            row = [name, now["build"], now["forward"]]
            if runs["before"]:
                before = {k: statistics.median(r[k] for r in runs["before"]) for k in ("build", "forward")}
                row += [before["build"], before["forward"], before["build"] / now["build"],
                        before["forward"] / now["forward"]]
            rows.append(row)
    header = ["model", "build s", f"forward s ({args.resolution}px, batch 8)"]
    if args.baseline:
        header += [f"build s @{args.baseline}", f"forward s @{args.baseline}", "build speed-up", "forward speed-up"]
    _common.table("Reference model build and forward (fresh process each)", header, rows, note=_common.machine())


if __name__ == "__main__":
    main()
