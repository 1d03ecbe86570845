"""Which axis of a tensor holds its channels, established from the layers that produce and consume it.

A rank-based guess (axis 1 for 4-D, the last axis for 3-D) is silently wrong on models that mix layouts: a
LayerNorm subclass that permutes internally, window-partitioned (B, G, P, C) tensors, channels-last MLPs in NCHW
blocks. So spp asks the layers: a tensor returned by a convolution has its channels on axis 1 (as many as
``out_channels``); one returned by a Linear on the last axis (``out_features``); one fed to a BatchNorm on axis 1
(``num_features``). A LayerNorm or RMSNorm counts only when its forward is torch's own: a subclass that overrides it
(timm's ``LayerNorm2d`` permutes before normalising) proves nothing by its type. Convolution, Linear, BatchNorm,
GroupNorm and pooling subclasses (weight standardisation, LoRA, norm + activation, "same" padding) count: what they
compute still puts the channels where torch's functional does (axis 1 for convolutions and batch / group norms,
the last axis for a matmul). The tensor's size on the axis is checked against the layer's channel count, and the
residual identity check backs every tap.

``layer_evidence`` reads one layer; the recorder (``spp.hooks``) follows a tensor back through the layers that
produced it during the first forward and refuses a tap whose axis stays unproven.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

Role = Literal["output", "input"]


@dataclass(frozen=True)
class Evidence:
    """Channels on ``axis`` (negative: counted from the end), ``channels`` of them, as ``layer`` says."""

    axis: int
    channels: int
    layer: str

    def resolve(self, ndim: int) -> int | None:
        """The axis in a tensor of rank ``ndim`` (None when the tensor has no such axis)."""
        return self.axis % ndim if -ndim <= self.axis < ndim else None


# A layer that returns its input's layout: the evidence is the input's.
PASS_THROUGH = "pass-through"

_CONV = (nn.modules.conv._ConvNd,)
_NORM_C = (nn.modules.batchnorm._NormBase,)  # BatchNorm*, InstanceNorm*, SyncBatchNorm
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd)
_ELEMENTWISE_BASES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_ACTIVATIONS = tuple(
    cls for name in ("ReLU", "ReLU6", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh", "ELU", "CELU", "SELU", "LeakyReLU",
                     "PReLU", "Hardswish", "Hardsigmoid", "Hardtanh", "Softplus", "Softsign", "Tanhshrink",
                     "LogSigmoid", "Threshold", "RReLU")
    if isinstance(cls := getattr(nn, name, None), type)
)
# Third-party norms whose forward is known to normalise one axis, by the qualified name of the forward they run
# (a subclass that does not override it runs the same code): channels last, or on axis 1 of NCHW.
_TIMM_NORM = "timm.layers.norm"
_TIMM_NORM_ACT = "timm.layers.norm_act"
_KNOWN_NORM_FORWARDS: dict[str, int] = {
    **{f"{_TIMM_NORM}.{c}.forward": -1 for c in ("LayerNorm", "LayerNormFp32", "RmsNorm", "RmsNormFp32", "SimpleNorm",
                                                  "SimpleNormFp32")},
    **{f"{_TIMM_NORM}.{c}.forward": 1 for c in ("LayerNorm2d", "LayerNorm2dFp32", "LayerNormExp2d", "RmsNorm2d",
                                                 "RmsNorm2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32")},
    **{f"{_TIMM_NORM_ACT}.{c}.forward": -1 for c in ("LayerNormAct", "LayerNormActFp32", "RmsNormAct",
                                                      "RmsNormActFp32")},
    **{f"{_TIMM_NORM_ACT}.{c}.forward": 1 for c in ("LayerNormAct2d", "LayerNormAct2dFp32", "RmsNormAct2d",
                                                     "RmsNormAct2dFp32", "FrozenBatchNormAct2d")},
}
# Third-party layers whose semantics are known, by qualified class name (nothing imported).
_KNOWN_LINEAR_LAST = {"transformers.pytorch_utils.Conv1D": "nf"}  # GPT-2's x @ W + b, W of shape (in, out)
_KNOWN_PASS_THROUGH = {"timm.layers.drop.DropPath", "torchvision.ops.stochastic_depth.StochasticDepth",
                       "timm.layers.activations.GELU", "timm.layers.activations.Swish"}


def _torch_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` runs ``base``'s own forward (a subclass that overrides it may permute, reshape...)."""
    return type(module).forward is base.forward


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def layer_evidence(module: nn.Module, role: Role, name: str = "") -> Evidence | str | None:
    """What ``module`` says of the channel axis of its output (``role="output"``) or its first input.

    Returns an ``Evidence``, ``PASS_THROUGH`` (the output has its input's layout: activations, dropout, identity,
    pooling), or None (this layer proves nothing).
    """
    where = f"{type(module).__name__} {name}".strip()
    if isinstance(module, _CONV):
        conv = module
        channels = conv.out_channels if role == "output" else conv.in_channels
        return Evidence(1, int(channels), f"{where} ({'out' if role == 'output' else 'in'}_channels {channels})")
    if isinstance(module, nn.Linear):
        channels = module.out_features if role == "output" else module.in_features
        return Evidence(-1, int(channels), f"{where} ({'out' if role == 'output' else 'in'}_features {channels})")
    qual = _qualname(module)
    if qual in _KNOWN_LINEAR_LAST:
        weight = getattr(module, "weight", None)
        if weight is not None and weight.ndim == 2:
            channels = int(weight.shape[1] if role == "output" else weight.shape[0])
            return Evidence(-1, channels, f"{where} (weight {tuple(weight.shape)})")
        return None
    if isinstance(module, nn.Embedding) and _torch_forward(module, nn.Embedding):
        return Evidence(-1, int(module.embedding_dim), f"{where} (embedding_dim {module.embedding_dim})") \
            if role == "output" else None
    norms: tuple[type[nn.Module], ...] = (nn.LayerNorm, *_rms_norm())
    if any(isinstance(module, norm) and _torch_forward(module, norm) for norm in norms):
        shape = tuple(module.normalized_shape)  # type: ignore[arg-type]
        if len(shape) == 1:
            return Evidence(-1, int(shape[0]), f"{where} (normalized_shape {shape})")
        return None  # normalised over (C, H, W) or more: the channel axis is not singled out
    known = _known_norm(module)
    if known is not None:
        axis, channels = known
        return Evidence(axis, channels, f"{where} (normalises {'the last axis' if axis < 0 else 'axis 1'} of "
                                        f"{channels})")
    if isinstance(module, _NORM_C):  # F.batch_norm / F.instance_norm normalise axis 1, whatever a subclass adds
        return Evidence(1, int(module.num_features), f"{where} (num_features {module.num_features})")
    if isinstance(module, nn.GroupNorm):  # F.group_norm groups axis 1
        return Evidence(1, int(module.num_channels), f"{where} (num_channels {module.num_channels})")
    if _passes_through(module):
        return PASS_THROUGH
    graph = getattr(module, "graph", None)
    if graph is not None and type(graph).__name__ == "Graph":  # torch.export / fx modules: read their aten ops
        return _graph_evidence(module, graph, role, where)
    return None


_GRAPH_PASS = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardtanh_",
               "hardswish", "hardswish_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "dropout", "clone",
               "contiguous", "detach", "alias", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool1d",
               "avg_pool1d", "max_pool3d", "avg_pool3d"}
_GRAPH_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_GRAPH_NORM_C = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "instance_norm",
                 "group_norm", "native_group_norm"}


def _graph_evidence(module: nn.Module, graph: object, role: Role, where: str) -> Evidence | str | None:
    """What the aten ops of an exported / traced module say: the op computing its output (through activations,
    dropout and pooling), or the first op taking its input."""
    import torch
    from torch import fx

    assert isinstance(graph, fx.Graph)

    def op(node: object) -> str:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return ""
        packet = getattr(node.target, "overloadpacket", None)
        return str(getattr(packet if packet is not None else node.target, "__name__", ""))

    def tensor(node: object) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value: object = module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            return value if isinstance(value, torch.Tensor) else None
        return None

    def read(node: fx.Node, reading: Role) -> Evidence | None:
        name, args = op(node), node.args
        weight = tensor(args[1]) if len(args) > 1 else None
        if name in _GRAPH_CONV and weight is not None and weight.ndim >= 3:
            groups = args[6] if name == "conv2d" and len(args) > 6 and isinstance(args[6], int) else 1
            channels = weight.shape[0] if reading == "output" else weight.shape[1] * groups
            return Evidence(1, int(channels), f"{where} ({name}, weight {tuple(weight.shape)})")
        if name == "linear" and weight is not None and weight.ndim == 2:
            channels = weight.shape[0] if reading == "output" else weight.shape[1]
            return Evidence(-1, int(channels), f"{where} (linear, weight {tuple(weight.shape)})")
        if name in _GRAPH_NORM_C:
            candidates = [tensor(a) for a in args[1:5]]
            found = next((t for t in candidates if t is not None and t.ndim == 1), None)
            if found is not None:
                return Evidence(1, int(found.shape[0]), f"{where} ({name}, {found.shape[0]} channels)")
        shape = args[1] if len(args) > 1 else None
        if name in ("layer_norm", "native_layer_norm") and isinstance(shape, (list, tuple)) and len(shape) == 1 \
                and isinstance(shape[0], int):
            return Evidence(-1, shape[0], f"{where} ({name} over {shape[0]})")
        return None

    nodes = list(graph.nodes)
    if role == "input":
        first = next((n for n in nodes if n.op == "placeholder"), None)
        users = list(first.users) if first is not None else []
        return read(users[0], "input") if len(users) == 1 else None
    outputs = [n for n in nodes if n.op == "output"]
    if not outputs:
        return None
    node = outputs[0].args[0]
    if isinstance(node, (tuple, list)):
        node = node[0] if node else None
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return None
        name = op(node)
        if name in _GRAPH_PASS or (name == "getitem" and len(node.args) == 2 and node.args[1] == 0):
            node = node.args[0]
            continue
        if name in ("max_pool2d_with_indices",):
            node = node.args[0]
            continue
        return read(node, "output")
    return None


def _known_norm(module: nn.Module) -> tuple[int, int] | None:
    """(axis, channels) for a third-party norm whose forward is known (timm's norms; HF's ``*RMSNorm``, which all
    normalise the hidden states' last axis)."""
    forward = type(module).forward
    axis = _KNOWN_NORM_FORWARDS.get(f"{forward.__module__}.{forward.__qualname__}")
    cls = type(module)
    if axis is None and cls.__module__.startswith("transformers.") and cls.__name__.endswith("RMSNorm"):
        axis = -1
    if axis is None:
        return None
    shape = getattr(module, "normalized_shape", None)
    weight = getattr(module, "weight", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return axis, int(shape[0])
    if weight is not None and getattr(weight, "ndim", 0) == 1:
        return axis, int(weight.shape[0])
    return None


def _rms_norm() -> tuple[type[nn.Module], ...]:
    cls = getattr(nn, "RMSNorm", None)
    return (cls,) if isinstance(cls, type) else ()


def _passes_through(module: nn.Module) -> bool:
    """Layers whose output has their input's layout and channel count (elementwise, or pooling over space)."""
    if isinstance(module, (*_ELEMENTWISE_BASES, *_ACTIVATIONS)):
        return type(module).forward.__module__.startswith("torch.nn.")
    if isinstance(module, _POOLS):
        return True
    return _qualname(module) in _KNOWN_PASS_THROUGH


def check_axis(shape: tuple[int, ...], evidence: Evidence) -> str | None:
    """None when a tensor of ``shape`` has ``evidence.channels`` channels on ``evidence.axis``; else why not."""
    axis = evidence.resolve(len(shape))
    if axis is None:
        return f"{evidence.layer} puts channels on axis {evidence.axis}, which a tensor of shape {shape} lacks"
    if shape[axis] != evidence.channels:
        return (f"{evidence.layer} implies {evidence.channels} channels on axis {axis}, but the tensor has shape "
                f"{shape}")
    return None
