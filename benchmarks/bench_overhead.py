"""Recording overhead: ``spp.hooks.record`` and a live ``SignalRecorder`` against a bare no-grad forward, and
against timm's ``ActivationStatsHook`` (avg_sq_ch_mean + avg_ch_var) hooked on the same modules.

Rows (same model, mode, inputs; candidates interleaved, medians):

* ``record()``: one call, as ``spp plot`` makes it: discovery, hooks, state save/restore, forward, snapshot;
* ``live recorder``: hooks already in place, per forward (what each further micro-batch, or a training step
  with a ``SignalRecorder`` open, costs);
* ``timm hooks``: ActivationStatsHook's two functions on the modules spp reads (its ``.item()`` syncs
  included), per forward, hooks in place; ``spp / timm`` compares the live recorder with it.

Targets: record() <= 1.05x a bare forward; live recorder <= 0.8x timm's hooks.
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


def timm_hooks(model, modules: list[str]):
    """ActivationStatsHook with avg_sq_ch_mean and avg_ch_var on exactly ``modules`` (its fnmatch scan skipped)."""
    from timm.utils.model import ActivationStatsHook, avg_ch_var, avg_sq_ch_mean

    hook = ActivationStatsHook(model, hook_fn_locs=[], hook_fns=[])
    hook.stats = {"avg_sq_ch_mean": [], "avg_ch_var": []}
    named = dict(model.named_modules())
    handles = [named[m].register_forward_hook(hook._create_hook(fn))
               for m in modules for fn in (avg_sq_ch_mean, avg_ch_var)]
    return hook, handles


def accounted(model, x, taps, mode: str, forwards: int = 3) -> tuple[float, float]:
    """(ms per forward spent inside spp's hooks and end-of-forward merge, that / the rest of the forward), timed
    inside the same forwards: immune to the machine's drift between repetitions, blind to indirect costs (cache
    pollution, torch's slower module call when hooks exist), which the interleaved wall-clock ratios include."""
    import time

    import spp.hooks

    spent = [0.0]

    def timed(factory):
        def make(fns):
            hook = factory(fns)

            def run(*args):
                t = time.perf_counter()
                try:
                    return hook(*args)
                finally:
                    spent[0] += time.perf_counter() - t

            return run

        return make

    real = spp.hooks._post_hook, spp.hooks._pre_hook
    spp.hooks._post_hook, spp.hooks._pre_hook = timed(real[0]), timed(real[1])
    try:
        recorder = spp.hooks.SignalRecorder(model, taps=taps, mode=mode)
        flush = recorder._flush

        def timed_flush():
            t = time.perf_counter()
            flush()
            spent[0] += time.perf_counter() - t

        recorder._flush = timed_flush
        with recorder, torch.no_grad():
            model(x)  # warm-up
            spent[0] = 0.0
            t = time.perf_counter()
            for _ in range(forwards):
                model(x)
            total = time.perf_counter() - t
    finally:
        spp.hooks._post_hook, spp.hooks._pre_hook = real
    return spent[0] / forwards * 1e3, spent[0] / (total - spent[0])


def measure(name: str, res: int, width: float, reps: int):
    import spp.hooks
    from spp.discovery import find_taps

    model, mode = build(name, width)
    label = f"{name}{f' w{width:g}' if not name.startswith('timm:') else ''} {res}px"
    x = torch.randn(8, 3, res, res, generator=torch.Generator().manual_seed(1))
    taps = find_taps(model)
    sites = sorted({s.module for t in taps[1:] for s in (t.output, t.residual)
                    if hasattr(s, "kind") and s.kind == "output"})
    recorder = spp.hooks.SignalRecorder(model, taps=taps, mode=mode)

    def bare():
        with torch.no_grad():
            model(x)

    def record_call():
        spp.hooks.record(model, x, mode=mode)

    def discovery():
        find_taps(model)

    live = (recorder.__enter__, bare, lambda: recorder.__exit__(None, None, None))
    runs: dict[str, list[float]] = {}
    t = _common.interleaved({"bare": bare, "record": record_call, "live": live, "discovery": discovery}, reps,
                            samples=runs)
    recorder.reset()
    rec_ratio, live_ratio = _common.paired(runs, "record", "bare"), _common.paired(runs, "live", "bare")
    row = [label, t["bare"] * 1e3, t["record"] * 1e3, t["live"] * 1e3, t["record"] / t["bare"],
           t["live"] / t["bare"], rec_ratio, _common.verdict(rec_ratio, 1.05), live_ratio,
           _common.verdict(live_ratio, 1.05)]
    in_hooks, share = accounted(model, x, taps, mode)
    setup_row = [label, len(taps) - 1, t["discovery"] * 1e3, (t["record"] - t["bare"]) * 1e3,
                 (t["live"] - t["bare"]) * 1e3, in_hooks, 1 + share]
    if x.ndim == 4 and "vit" not in name:
        handles: list = []

        def add_timm(handles=handles):
            handles.extend(timm_hooks(model, sites)[1])

        def remove_timm(handles=handles):
            for h in handles:
                h.remove()
            handles.clear()

        timm = (add_timm, bare, remove_timm)
        pr: dict[str, list[float]] = {}
        tp = _common.interleaved({"bare": bare, "timm": timm, "live": live}, reps, samples=pr)
        recorder.reset()
        peer = _common.paired(pr, "live", "timm")
        peer_row = [label, len(sites), tp["bare"] * 1e3, tp["timm"] * 1e3, tp["live"] * 1e3,
                    tp["live"] / tp["timm"], peer, _common.verdict(peer, 0.8),
                    (tp["timm"] - tp["bare"]) / max(tp["live"] - tp["bare"], 1e-9)]
    else:
        peer_row = [label, len(sites), "-", "-", "-", "-", "n/a", "-",
                    "timm's functions reduce axes (0, 2, 3): 4-D only"]
    return row, setup_row, peer_row


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=None, help="width of the 600-layer reference")
    args = p.parse_args()
    _common.set_threads(args.threads)

    reps = args.reps or (2 if args.quick else 7)
    width = args.width or (0.25 if args.quick else 1.0)
    configs = [("nf_resnet600", 64), ("nf_resnet600", 224), ("timm:resnet50", 224),
               ("timm:vit_small_patch16_224", 224)]
    if args.quick:
        configs = [("nf_resnet600", 64), ("timm:resnet50", 224)]
    rows, peer_rows, setup_rows = [], [], []
    for name, res in configs:
        r, su, pe = measure(name, res, width, reps)
        rows.append(r)
        setup_rows.append(su)
        peer_rows.append(pe)
    _common.table("Recording overhead vs a bare no-grad forward (batch 8)",
                  ["model", "bare ms", "record() ms", "live ms/forward", "record()/bare (medians)",
                   "live/bare (medians)", "record()/bare (paired)", "<=1.05", "live/bare (paired)", "<=1.05"], rows,
                  note=f"{_common.machine()}. {reps} rounds, candidates interleaved in rotating order; (medians): "
                       "ratio of the medians; (paired): median over rounds of the ratio within a round, robust to "
                       "the machine's speed drifting between rounds. Verdicts on the paired ratios.")
    _common.table("Where record()'s extra time goes", ["model", "blocks", "discovery ms (find_taps)",
                  "record() - bare ms", "live - bare ms", "in hooks ms/forward", "(forward) / (forward - hooks)"],
                  setup_rows,
                  note="record() - bare = discovery + hook registration + state save/restore + statistics + "
                       "snapshot; live - bare = statistics and hook dispatch per forward. The last two columns time "
                       "spp's hooks and end-of-forward merge inside the same forwards (no drift between "
                       "repetitions; indirect costs left out).")
    _common.table("Against timm.utils.ActivationStatsHook (avg_sq_ch_mean + avg_ch_var, same modules)",
                  ["model", "modules", "bare ms", "timm hooks ms", "spp live ms", "spp/timm (medians)",
                   "spp/timm (paired)", "<=0.8", "timm overhead / spp overhead"], peer_rows)


if __name__ == "__main__":
    main()
