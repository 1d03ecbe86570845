"""The public API: what `import spp` loads and exposes, and the recorder inside a training loop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import spp
import spp.hooks
from spp.discovery import find_taps
from spp.models import create_model
from tests.helpers import capture_outputs, direct_stats


def _loaded_after(code: str, *flags: str) -> tuple[list[str], str]:
    """Top-level heavy modules loaded by ``code`` in a fresh interpreter, and its stderr."""
    probe = ("import sys, json; " + code + "; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'matplotlib', 'pandas', 'torch', 'timm', 'PIL'})))")
    out = subprocess.run([sys.executable, *flags, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr



def test_imports_stay_light():
    assert _loaded_after("import spp")[0] == []
    loaded, importtime = _loaded_after("import spp.hooks; from spp import hooks; import spp.files, spp.comparison; "
                                       "spp.load_record; spp.hooks.SignalRecorder", "-X", "importtime")
    assert "torch" in loaded and "matplotlib" not in loaded
    assert "spp.hooks" in importtime and "matplotlib" not in importtime



PUBLIC = ["DEFAULT_RULES", "Record", "Rule", "SignalRecorder", "Site", "SppError", "Tap", "__version__", "check",
          "compare", "find_taps", "load_record", "plot", "record", "save_record"]


def test_public_surface_is_small_and_lazy():
    """`import spp` exposes the API and nothing else (no typing helpers, no submodule on demand)."""
    from spp.comparison import compare_records
    from spp.files import load_record

    assert dir(spp) == PUBLIC
    assert spp.load_record is load_record and spp.compare is compare_records and spp.record is spp.hooks.record
    for name in PUBLIC:
        assert name == "__version__" or getattr(spp, name).__doc__, f"spp.{name} has no docstring"
    out = subprocess.run([sys.executable, "-c", "import spp; spp.cli"], capture_output=True, text=True)
    assert out.returncode != 0 and "has no attribute 'cli'" in out.stderr  # no submodule imported behind a name
    with pytest.raises(AttributeError):
        spp.no_such_thing  # noqa: B018









def test_signal_recorder_snapshot_and_reset_in_a_training_loop():
    """snapshot() after two SGD steps covers both forwards; reset() + one step covers that step only."""
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.0625)  # no BatchNorm: statistics per sample, not per batch
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before: list[torch.nn.Module] = []

    def step(x: torch.Tensor) -> None:
        before.append(copy.deepcopy(model))
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with spp.hooks.SignalRecorder(model) as recorder:
        step(xs[0])
        step(xs[1])
        two = recorder.snapshot()
        recorder.reset()
        step(xs[2])
        one = recorder.snapshot()
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in model.modules())
    assert not torch.equal(before[0].fc.weight, before[2].fc.weight)  # the weights did move

    taps = find_taps(model)[1:]
    outputs = [t.output.module for t in taps]
    branches = [t.residual.module for t in taps]
    seen = [capture_outputs(m, outputs + branches, [x]) for m, x in zip(before, xs, strict=True)]
    for k, tap in enumerate(taps, start=1):
        both = torch.cat([seen[0][tap.output.module][0], seen[1][tap.output.module][0]])
        sq, var = direct_stats(both)
        assert two.rows[k]["avg_sq_mean"] == pytest.approx(sq, rel=1e-5), tap.name
        assert two.rows[k]["avg_var"] == pytest.approx(var, rel=1e-5), tap.name
        res = torch.cat([seen[0][tap.residual.module][0], seen[1][tap.residual.module][0]])
        assert two.rows[k]["res_avg_var"] == pytest.approx(direct_stats(res)[1], rel=1e-5), tap.name
        assert two.rows[k]["count"] == both.numel() // both.shape[1]
    assert (two.settings["samples"], two.settings["batches"]) == (4, 2)

    assert (one.settings["samples"], one.settings["batches"]) == (2, 1)
    for k, tap in enumerate(taps, start=1):
        assert one.rows[k]["count"] == two.rows[k]["count"] // 2, (
            f"after reset(), {tap.name} saw {one.rows[k]['count']} values per channel: the hooks must feed the "
            "new moments, not the ones reset() replaced")
        sq, var = direct_stats(seen[2][tap.output.module][0])
        assert one.rows[k]["avg_sq_mean"] == pytest.approx(sq, rel=1e-5), f"after reset(): {tap.name}"
        assert one.rows[k]["avg_var"] == pytest.approx(var, rel=1e-5), f"after reset(): {tap.name}"
    # After reset() the recorder's one step is exactly what a fresh one-call recording of that step gives.
    fresh = spp.hooks.record(before[2], xs[2], mode="train")
    assert [r["avg_var"] for r in one.rows] == [r["avg_var"] for r in fresh.rows]
    assert [r["res_avg_var"] for r in one.rows[1:]] == [r["res_avg_var"] for r in fresh.rows[1:]]

