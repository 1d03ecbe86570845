"""Channel axes proven from layers (spp.axes) and traced through one forward (spp.provenance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spp.axes import PASS_THROUGH, Evidence, check_axis, layer_evidence
from spp.provenance import Provenance


class PermutingLayerNorm(nn.LayerNorm):
    """timm's LayerNorm2d pattern: an nn.LayerNorm subclass that normalises axis 1 of NCHW by permuting."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class WSConv(nn.Conv2d):
    """A conv subclass with its own forward (weight standardisation): still a convolution, channels on axis 1."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize(
    ("layer", "role", "expected"),
    [
        (nn.Conv2d(3, 8, 3), "output", (1, 8)),
        (nn.Conv2d(3, 8, 3), "input", (1, 3)),
        (WSConv(3, 8, 3), "output", (1, 8)),
        (nn.Linear(5, 7), "output", (-1, 7)),
        (nn.Linear(5, 7), "input", (-1, 5)),
        (nn.LayerNorm(6), "output", (-1, 6)),
        (nn.BatchNorm2d(4), "input", (1, 4)),
        (nn.GroupNorm(2, 6), "output", (1, 6)),
        (nn.Embedding(10, 12), "output", (-1, 12)),
    ],
)
def test_layers_say_where_their_channels_are(layer, role, expected):
    found = layer_evidence(layer, role)
    assert isinstance(found, Evidence) and (found.axis, found.channels) == expected


def test_a_norm_subclass_that_permutes_proves_nothing_unless_its_forward_is_known():
    assert layer_evidence(PermutingLayerNorm(6), "output") is None  # the caformer bug: its type would say "last"
    assert layer_evidence(nn.LayerNorm((4, 6, 6)), "output") is None  # normalised over (C, H, W): no single axis
    from timm.layers import LayerNorm2d

    known = layer_evidence(LayerNorm2d(6), "output")  # timm's own: its forward is known to normalise axis 1
    assert isinstance(known, Evidence) and (known.axis, known.channels) == (1, 6)


def test_elementwise_layers_pass_the_question_on():
    assert all(layer_evidence(m, "output") == PASS_THROUGH
               for m in (nn.ReLU(), nn.GELU(), nn.Dropout(0.1), nn.Identity(), nn.MaxPool2d(2)))


def test_check_axis_compares_the_size_with_the_layers_count():
    conv = Evidence(1, 8, "conv")
    assert check_axis((2, 8, 5, 5), conv) is None
    assert "implies 8 channels on axis 1" in check_axis((2, 5, 5, 8), conv)
    assert "lacks" in check_axis((8,), Evidence(2, 8, "x"))


def test_provenance_follows_pass_through_layers():
    """conv -> relu -> maxpool: the pool's output has the conv's 8 channels on axis 1; a permute makes a tensor
    no layer returned (nothing proven); consumers prove what producers cannot (the Linear takes channels last)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Linear(8, 4)
    outer = nn.Sequential(model, head)
    prov = Provenance(outer)
    seen = {}
    h = model.register_forward_hook(lambda m, a, out: seen.setdefault("pooled", out))
    with torch.no_grad():
        pooled = model(torch.randn(2, 3, 8, 8))
        permuted = pooled.permute(0, 2, 3, 1)
        head(permuted)
    h.remove()
    found = prov.evidence_of(seen["pooled"])
    assert (found.axis, found.channels) == (1, 8)
    assert prov.evidence_of(permuted) is None
    taken = prov.consumer_evidence(permuted)
    assert (taken.axis, taken.channels) == (-1, 8)
    prov.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in outer.modules())
