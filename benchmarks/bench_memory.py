"""Peak memory of recording against a bare no-grad forward, each configuration in a fresh process, and memory
and time against the number of micro-batches (inputs drawn lazily, one micro-batch at a time).

CPU: peak resident set size (``VmHWM`` of /proc/self/status, reset through /proc/self/clear_refs after the model
is built, so "forward peak" is what the forward itself adds); CUDA: ``torch.cuda.max_memory_allocated``.
Targets: record's peak <= 1.10x the bare forward's, at 1, 8 and 64 micro-batches; time linear in micro-batches.
"""

from __future__ import annotations

import json
import sys
import time

import _common


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(model_name: str, width: float, res: int, batch: int, batches: int, which: str, device: str,
          threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    import spp.hooks
    from spp.discovery import find_taps
    from spp.inputs import GaussianInput

    torch.manual_seed(0)
    if model_name.startswith("timm:"):
        import timm

        model, mode = timm.create_model(model_name[5:], pretrained=False).eval(), "eval"
    else:
        from spp.models import create_model

        model, mode = create_model(model_name, width=width), "train"
    model.to(device)
    source = GaussianInput((3, res, res), num_samples=batch * batches, batch_size=batch)
    find_taps(model)  # both runs import what discovery imports (torch.fx, ...) before the measurement starts
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS") * 1024
    t = time.perf_counter()
    if which == "bare":
        model.train(mode == "train")
        with torch.no_grad():
            for x in source.batches(device=device):
                model(x)
    else:
        spp.hooks.record(model, source.batches(device=device), mode=mode)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {"seconds": seconds, "before": before, "peak": peak}


def measure(model: str, width: float, res: int, batch: int, batches: int, which: str, device: str,
            threads: int | None = None) -> dict:
    return _common.run_json([__file__, "--child",
                             json.dumps([model, width, res, batch, batches, which, device, threads])])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    mib = 1 / 2**20
    if args.quick:
        configs = [("nf_resnet600", 0.25, 64), ("timm:resnet50", 1.0, 128)]
        scaling = ("nf_resnet50", 0.25, 64, (1, 8, 64))
    else:
        configs = [("nf_resnet600", 1.0, 64), ("nf_resnet600", 1.0, 224), ("timm:resnet50", 1.0, 224),
                   ("timm:vit_small_patch16_224", 1.0, 224)]
        scaling = ("nf_resnet600", 1.0, 64, (1, 8, 64))

    def pair(model, width, res, batches):
        """(bare, record): each the lowest-peak of ``reps`` fresh processes, the two kinds alternating."""
        import statistics

        runs: dict[str, list[dict]] = {"bare": [], "record": []}
        for _ in range(reps):
            for which in runs:
                runs[which].append(measure(model, width, res, 8, batches, which, args.device, args.threads))
        out = []
        for which in ("bare", "record"):
            low = dict(min(runs[which], key=lambda r: r["peak"]))  # memory noise is additive: the lowest run
            low["seconds"] = statistics.median(r["seconds"] for r in runs[which])
            out.append(low)
        return out

    rows = []
    for model, width, res in configs:
        b, r = pair(model, width, res, 1)
        fb, fr = b["peak"] - b["before"], r["peak"] - r["before"]
        rows.append([f"{model}{'' if model.startswith('timm:') else f' w{width:g}'} {res}px", b["peak"] * mib,
                     r["peak"] * mib, r["peak"] / b["peak"], _common.verdict(r["peak"] / b["peak"], 1.10),
                     fb * mib, fr * mib, fr / max(fb, 1)])
    unit = "GPU allocated" if args.device.startswith("cuda") else "RSS"
    _common.table(f"Peak memory, record() vs a bare no-grad forward (batch 8, one micro-batch, {args.device})",
                  ["model", f"bare peak {unit} MiB", f"record peak {unit} MiB", "record/bare", "<=1.10",
                   "bare forward adds MiB", "record adds MiB", "adds ratio"], rows,
                  note="peak: the whole process (model, libraries, forward); 'adds': peak minus the memory in use "
                       "just before the forward.")
    model, width, res, counts = scaling
    rows = []
    base = None
    for k in counts:
        b, r = pair(model, width, res, k)
        base = base or (b["seconds"], r["seconds"])
        rows.append([k, b["peak"] * mib, r["peak"] * mib, r["peak"] / b["peak"],
                     _common.verdict(r["peak"] / b["peak"], 1.10), b["seconds"], r["seconds"],
                     r["seconds"] / b["seconds"], r["seconds"] / k / base[1]])
    _common.table(f"Micro-batches: {model} w{width:g} {res}px, batch 8, inputs drawn lazily ({args.device})",
                  ["micro-batches", f"bare peak {unit} MiB", f"record peak {unit} MiB", "record/bare", "<=1.10",
                   "bare s", "record s", "record/bare time", "record s per batch / at 1"], rows,
                  note="Linear time: the last column stays near 1 (or below: fixed costs are paid once).")


if __name__ == "__main__":
    main()
