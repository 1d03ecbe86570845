# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Signal Propagation Plots in a notebook
#
# Open with `jupytext --to notebook examples/notebook.py`, or run it as a script. `SPP_EXAMPLE_OUT`,
# `SPP_EXAMPLE_RESOLUTION`, `SPP_EXAMPLE_BATCH` and `SPP_EXAMPLE_WIDTH` shrink it (the tests run it tiny).
#
# `import spp.hooks` loads torch but not matplotlib: figures cost nothing until one is drawn.

# %%
import os
from pathlib import Path

import timm
import torch

import spp
import spp.hooks
from spp.comparison import compare_records
from spp.run import RunConfig, record_run

OUT = Path(os.environ.get("SPP_EXAMPLE_OUT", "spp_notebook"))
OUT.mkdir(parents=True, exist_ok=True)
RESOLUTION = int(os.environ.get("SPP_EXAMPLE_RESOLUTION", "128"))
BATCH = int(os.environ.get("SPP_EXAMPLE_BATCH", "8"))
WIDTH = float(os.environ.get("SPP_EXAMPLE_WIDTH", "1.0"))

# %% [markdown]
# ## One call: hooks on a timm model
#
# `spp.hooks.record` finds the residual blocks (timm's BasicBlock: the branch ends at `bn2`), runs the
# model in train mode (BatchNorm uses batch statistics, as at the start of training) and puts the model back
# exactly as it was: flags, buffers, hooks. timm zero-initialises each block's last BN gain, which makes every
# residual branch exactly zero at init (spp notes it); `zero_init_last=False` shows the branches.

# %%
torch.manual_seed(0)
model = timm.create_model("resnet18", pretrained=False, zero_init_last=False)
x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
rec = spp.hooks.record(model, x, settings={"label": "timm resnet18"})
rec  # noqa: B018 -- in Jupyter: a compact HTML table

# %% [markdown]
# The numbers are a DataFrame away: one row per tap point (the stem, then every block).

# %%
df = rec.to_frame()
print(df[["block", "name", "stage", "avg_sq_mean", "avg_var", "res_avg_var"]].to_string(index=False))

# %% [markdown]
# `spp.plot` draws the three panels and returns the Figure; pass three axes to place it yourself.

# %%
fig = spp.plot(rec, title="timm resnet18 at initialisation")
fig.savefig(OUT / "resnet18.png")

# %% [markdown]
# ## In a training loop: `SignalRecorder`
#
# `mode=None` (the default) leaves the model as your loop sets it. `snapshot()` returns the Record so far,
# `reset()` starts a new one; the hooks stay until the `with` block ends.

# %%
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
target = torch.randint(0, 1000, (BATCH,), generator=torch.Generator().manual_seed(1))
snapshots = []
model.train()
with spp.hooks.SignalRecorder(model) as recorder:
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshot = recorder.snapshot()
        snapshot.settings["label"] = f"step {step}"
        snapshots.append(snapshot)
        recorder.reset()
        print(f"step {step}: loss {loss.item():.3f}, final avg var {snapshot.rows[-1]['avg_var']:.4g}")

# %% [markdown]
# ## Save, load, compare
#
# Records save as `.pt` (read back with `weights_only=True`), `.json`, `.parquet` or `.csv`, exactly.

# %%
path = spp.save_record(rec, OUT / "resnet18.pt")
again = spp.load_record(path)
assert again.rows[5]["avg_var"] == rec.rows[5]["avg_var"]

# %% [markdown]
# Same architecture, so the comparison aligns by tap name: where did three SGD steps move the signal most?

# %%
steps = compare_records([snapshots[0], snapshots[-1]])
print(steps.alignment_note)
print(steps.divergence.to_string(index=False))

# %% [markdown]
# Against spp's BN-ReLU-Conv ResNet-50 (16 blocks vs 8) the alignment is by relative depth.

# %%
reference = record_run(RunConfig(model="bn_relu_resnet50", model_kwargs={"width": WIDTH},
                                   resolution=RESOLUTION, batch_size=BATCH, label="BN-ReLU-Conv ResNet-50"))
both = compare_records([rec, reference])
print(both.alignment_note)
print(both.stages.to_string(index=False))
fig = spp.plot([rec, reference], x="relative", title="timm resnet18 vs BN-ReLU-Conv ResNet-50")
fig.savefig(OUT / "compare.png")
