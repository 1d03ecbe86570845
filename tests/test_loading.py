"""Model resolution: names, files, saved programs, pickles and checkpoints, each failure a one-line SppError."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from spp import hooks
from spp.discovery import find_taps
from spp.errors import SppError
from spp.loading import IMAGENET_CONFIG, load_checkpoint, load_model, parse_kwargs
from spp.taps import Site
from tests.toys import Chain, PreActToy

FACTORY_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Toy(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.block = Block(width)
            self.head = nn.Linear(width, 2)

        def forward(self, x):
            return self.head(self.block(self.stem(x)).mean((2, 3)))

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))

        def forward(self, x):
            return x + self.body(x)

    def make(width=4, seed=0):
        torch.manual_seed(seed)
        return Toy(width)

    def not_a_module():
        return 3
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "toy_model.py"
    path.write_text(FACTORY_FILE)
    return str(path)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---- names --------------------------------------------------------------------------------------------------


def test_builtin_name_resolves_to_the_reference_model():
    loaded = load_model("bn_relu_resnet50", model_kwargs={"width": 0.25})
    assert (loaded.source, loaded.name, type(loaded.model).__name__) == ("spp", "bn_relu_resnet50", "ResNet")
    assert loaded.data_config == IMAGENET_CONFIG and "input_size" not in loaded.data_config
    assert loaded.model.num_features == 512  # 2048 * 0.25


@pytest.mark.parametrize("spec", ["resnet18", "timm:resnet18"])
def test_timm_names_bare_and_prefixed(spec):
    loaded = load_model(spec)
    reference = timm.create_model("resnet18", pretrained=False)
    assert loaded.source == "timm" and loaded.name == "resnet18"
    assert type(loaded.model) is type(reference)
    assert loaded.model.state_dict().keys() == reference.state_dict().keys()
    assert loaded.data_config == timm.data.resolve_data_config({}, model=reference)


def test_timm_kwargs_set_the_input_size():
    loaded = load_model("vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 8, "in_chans": 1})
    assert loaded.data_config["input_size"] == (1, 32, 32)
    assert loaded.data_config["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert loaded.model(torch.zeros(1, 1, 32, 32)).shape == (1, 1000)  # the size the config promises works


def test_torchvision_names():
    loaded = load_model("torchvision:resnet18")
    assert isinstance(loaded.model, torchvision.models.ResNet) and loaded.source == "torchvision"
    bare = load_model("mobilenet_v2")  # not a timm name: found in torchvision
    assert isinstance(bare.model, torchvision.models.MobileNetV2) and bare.source == "torchvision"
    assert bare.data_config["mean"] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [
        ("resnet5O", "resnet50"),
        ("timm:vit_tiny_patch16_22", "vit_tiny_patch16_224"),
        ("tv:resnet1", "resnet18"),
        ("nf_resnet05", "nf_resnet50"),
    ],
)
def test_unknown_names_suggest_close_ones(spec, suggestion):
    with pytest.raises(SppError) as exc:
        load_model(spec)
    message = one_line(exc)
    assert "unknown" in message and f"did you mean: {suggestion}" in message


def test_bad_kwargs_are_one_line():
    with pytest.raises(SppError) as exc:
        load_model("timm:resnet18", model_kwargs={"bogus": 1})
    assert one_line(exc).startswith("bad option for resnet18: TypeError:") and "bogus" in str(exc.value)
    assert parse_kwargs('{"width": 0.5}') == {"width": 0.5}
    with pytest.raises(SppError, match="not valid JSON"):
        parse_kwargs("{width: 1}")


def test_pretrained_download_failure_is_a_clear_error(monkeypatch):
    """The hub answers the probe but the download fails: one line with the library's own reason."""
    import spp.loading

    monkeypatch.setattr(spp.loading, "_reachable", lambda host, **kw: True)

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("not reached")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SppError) as exc:
        load_model("timm:resnet18", pretrained=True)
    assert one_line(exc) == (
        "fetching the pretrained weights of resnet18 failed: OSError: We couldn't connect to "
        "'https://huggingface.co'; run without --pretrained or pass --checkpoint"
    )

    def no_download(name, weights=None, **kwargs):
        raise RuntimeError(f"<urlopen error [Errno -2] Name or service not known> ({name}, {weights})")

    monkeypatch.setattr(torchvision.models, "get_model", no_download)
    with pytest.raises(SppError, match=r"^fetching the pretrained weights of resnet18 failed: RuntimeError: <urlopen"):
        load_model("torchvision:resnet18", pretrained=True)
    with pytest.raises(SppError, match="built-in reference model without pretrained weights"):
        load_model("nf_resnet50", pretrained=True)


def test_loading_imports_no_torch():
    code = "import sys, spp.loading; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- FILE.py:factory -----------------------------------------------------------------------------------------


def test_factory_file(factory_file):
    loaded = load_model(f"{factory_file}:make", model_kwargs={"width": 6})
    assert (loaded.source, loaded.name) == ("file", "make")
    assert loaded.model.stem.out_channels == 6
    taps = find_taps(loaded.model)
    assert [t.residual for t in taps[1:]] == [Site("block.body")]  # the traced fallback finds its residual add


def test_factory_file_errors(factory_file, tmp_path):
    with pytest.raises(SppError) as exc:
        load_model(f"{factory_file}:mak")
    assert one_line(exc) == (
        f"{factory_file} has no factory 'mak' (did you mean: make?); it defines: Block, Toy, make, not_a_module"
    )
    with pytest.raises(SppError, match=r"not_a_module returned int, not a torch.nn.Module"):
        load_model(f"{factory_file}:not_a_module")
    with pytest.raises(SppError, match="does not exist"):
        load_model(f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(SppError, match=r"name the factory to call: .*toy_model.py:FUNCTION"):
        load_model(factory_file)
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(SppError, match=r"importing .*broken.py failed: ModuleNotFoundError"):
        load_model(f"{broken}:make")


# ---- saved programs and pickles ------------------------------------------------------------------------------


def test_torch_export_file_keeps_blocks_hookable(tmp_path):
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "r18.pt2"
    torch.export.save(torch.export.export(eager, (x,)), str(path))
    loaded = load_model(str(path))
    assert loaded.source == "export" and loaded.name == "r18"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), eager(x))
    taps = find_taps(loaded.model)  # class names are gone: the traced fallback reads the exported graphs
    eager_taps = find_taps(eager)
    assert [(t.module, t.residual) for t in taps] == [(t.module, t.residual) for t in eager_taps]
    exported = hooks.record(loaded.model, x, mode="eval", taps=taps)
    reference = hooks.record(eager, x, mode="eval")
    for a, b in zip(exported.rows, reference.rows, strict=True):
        assert a["avg_var"] == pytest.approx(b["avg_var"], rel=1e-5)
        assert a["res_avg_var"] == pytest.approx(b["res_avg_var"], rel=1e-5, nan_ok=True)


def test_torchscript_file_loads(tmp_path):
    path = tmp_path / "toy.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(Chain(PreActToy())).save(str(path))
    loaded = load_model(str(path))
    assert loaded.source == "torchscript" and isinstance(loaded.model, torch.jit.ScriptModule)
    with pytest.raises(SppError, match="TorchScript models run their forward in C"):
        find_taps(loaded.model)


def test_pickled_module_needs_trust(tmp_path, factory_file):
    model = load_model(f"{factory_file}:make").model
    path = tmp_path / "whole.pt"
    torch.save(model, str(path))
    with pytest.raises(SppError) as exc:
        load_model(str(path))
    assert "is a pickled Python object" in one_line(exc) and "--trust-pickle only if you trust the file" in str(
        exc.value
    )
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.source == "pickle"
    for (k, a), (k2, b) in zip(loaded.model.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_state_dict_file_as_model_points_to_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, str(path))
    with pytest.raises(SppError, match=r"holds weights, not a model; .* --checkpoint$"):
        load_model(str(path))
    with pytest.raises(SppError, match="does not exist"):
        load_model(str(tmp_path / "nothing.pt"))


# ---- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "state_dict_ema", "ddp"])
def test_checkpoint_formats(tmp_path, factory_file, wrap):
    source = load_model(f"{factory_file}:make", model_kwargs={"seed": 1}).model
    state = source.state_dict()
    if wrap == "ddp":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "plain":
        obj = state
    else:
        obj = {wrap: state, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, str(path))
    loaded = load_model(f"{factory_file}:make", model_kwargs={"seed": 2}, checkpoint=str(path))
    assert loaded.checkpoint == str(path)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    fresh = load_model(f"{factory_file}:make", model_kwargs={"seed": 2}).model
    assert not torch.equal(fresh.stem.weight, state["stem.weight"])  # the checkpoint really changed the weights


def test_checkpoint_mismatches(tmp_path, factory_file):
    model = load_model(f"{factory_file}:make").model
    state = model.state_dict()
    bad = {k: v for k, v in state.items() if k != "head.bias"}
    bad["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(bad, str(path))
    with pytest.raises(SppError) as exc:
        load_checkpoint(model, str(path))
    assert one_line(exc) == (
        f"checkpoint {path} does not match the model: 1 missing (head.bias); 1 unexpected (extra.weight)"
    )
    wide = load_model(f"{factory_file}:make", model_kwargs={"width": 5}).model.state_dict()
    torch.save(wide, str(path))
    with pytest.raises(
        SppError,
        match=r"9 tensors differ in shape \(checkpoint vs model: stem.weight: "
        r"\(5, 3, 3, 3\) vs \(4, 3, 3, 3\)",
    ):
        load_checkpoint(model, str(path))
    torch.save({"optimizer": {"lr": 0.1}}, str(path))
    with pytest.raises(SppError, match=r"has no state_dict: top-level keys are optimizer$"):
        load_checkpoint(model, str(path))


def test_checkpoint_with_pickled_objects_needs_trust(tmp_path, factory_file):
    model = load_model(f"{factory_file}:make").model
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "net": nn.Identity()}, str(path))
    with pytest.raises(SppError, match=r"weights_only=True; pass --trust-pickle only if you trust the file$"):
        load_checkpoint(model, str(path))
    load_checkpoint(model, str(path), trust_pickle=True)  # the state_dict key is found next to the object
