"""ichtrain.model: every torchvision family built, pretrained weights loaded, the input widened, the head replaced."""

from __future__ import annotations

import ast
import pickle

import pytest
import torch
import torchvision

from ichtrain.config import ARCHS
from ichtrain.errors import CheckpointError, ConfigError
from ichtrain.model import (
    UNSUPPORTED,
    build_model,
    classifier,
    first_conv,
    load_state_dict,
    random_init_advice,
    widen_input,
)

#: One small member of each family in ARCHS (alexnet stands for vgg's layout); the drift test checks names only.
FAMILIES = (
    "resnet18",
    "resnext50_32x4d",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "swin_t",
    "googlenet",
    "alexnet",
)


def test_default_resnet152_forward_and_one_step():
    model = build_model("resnet152", n_outputs=6)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 6
    assert model.conv1.in_channels == 3
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[0, 0, 0, 1, 0, 1], [0] * 6], dtype=torch.float32)
    before = model.fc.weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.fc.weight)


def test_unknown_arch_lists_choices():
    with pytest.raises(ConfigError, match="unknown arch 'lenet'; choose one of resnet18, resnet34, resnet50"):
        build_model("lenet")
    with pytest.raises(ConfigError, match="'vit_b_16' is not supported: it takes only the one input size.*resnet18"):
        build_model("vit_b_16")


def test_pretrained_backbone_loaded_and_classifier_replaced(tmp_path):
    source = torchvision.models.resnet18()  # stands in for ImageNet weights the user downloaded
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", n_outputs=1, pretrained=path)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 1


def test_pretrained_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit this architecture"):
        build_model("resnet18", pretrained=path)


def test_weights_file_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run at load time",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_dict(path)


def test_widened_input_spreads_pretrained_filters():
    model = torchvision.models.resnet18()
    rgb = model.conv1.weight.detach().clone()
    widen_input(model, windows=3, slices=3)
    w = model.conv1.weight
    assert w.shape[1] == 9
    for c in range(9):
        torch.testing.assert_close(w[:, c], rgb[:, c % 3] / 3)
    # A 9-channel input made of three copies of one 3-channel image gives the original response.
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        model.conv1(x.repeat(1, 3, 1, 1)), torch.nn.functional.conv2d(x, rgb, stride=2, padding=3)
    )


@pytest.mark.parametrize("windows", [1, 2, 4, 5])
def test_widened_input_maps_each_window_to_one_filter_in_every_neighbour(windows):
    """2.5D with any number of windows: window w of every z-neighbour starts as the same pretrained filter."""
    model = torchvision.models.resnet18()
    rgb = model.conv1.weight.detach().clone()
    widen_input(model, windows=windows, slices=3)
    w = model.conv1.weight.detach()
    assert w.shape[1] == 3 * windows
    for window in range(windows):
        for z in range(3):
            torch.testing.assert_close(w[:, z * windows + window], rgb[:, window % 3] * 3 / (3 * windows))


def test_build_model_takes_windows_and_slices():
    model = build_model("resnet18", n_outputs=6, windows=4, slices=3)
    assert model.conv1.in_channels == 12
    assert model(torch.randn(1, 12, 64, 64)).shape == (1, 6)


def test_archs_are_torchvision_classification_models_but_the_unsupported():
    """ARCHS (a static tuple, so that --help needs no torch) and UNSUPPORTED cover torchvision's list exactly."""
    listed = torchvision.models.list_models(module=torchvision.models)
    assert len(set(ARCHS)) == len(ARCHS)
    assert not set(ARCHS) & set(UNSUPPORTED)
    assert sorted(ARCHS + tuple(UNSUPPORTED)) == sorted(listed)
    # The RSNA 2019 winners' backbones that torchvision has (it has no se-resnext; regnet_y is its SE family).
    regnets = {name for name in listed if name.startswith("regnet")}
    winners = {
        "densenet121",
        "densenet169",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "convnext_tiny",
        *(f"efficientnet_b{i}" for i in range(8)),
        *regnets,
    }
    assert winners <= set(ARCHS)
    assert set(FAMILIES) <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_init_advice_saves_the_default_weights_of_every_arch(arch):
    command = random_init_advice(arch).split('python -c "', 1)[1].split('"', 1)[0]
    ast.parse(command)
    assert f"torchvision.models.get_model('{arch}', weights='DEFAULT')" in command
    assert torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"]  # resolves without a download


def _saved(model: torch.nn.Module, path) -> torch.nn.Module:
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_loads_widens_and_replaces_its_head(arch, tmp_path):
    """Pretrained round trip, first-conv rule and head, from a file saved from torchvision's own constructor."""
    torch.manual_seed(0)
    quiet = {"init_weights": True} if arch == "googlenet" else {}  # googlenet warns without it
    source = _saved(torchvision.models.get_model(arch, weights=None, **quiet), tmp_path / "w.pth")
    for slices in (1, 3):
        model = build_model(arch, n_outputs=5, windows=3, slices=slices, pretrained=tmp_path / "w.pth").eval()
        name, conv = first_conv(model)
        assert conv.in_channels == 3 * slices
        torch.testing.assert_close(conv.weight, source.get_submodule(name).weight.repeat(1, slices, 1, 1) / slices)
        head = classifier(model)
        assert head is [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert head.out_features == 5
        assert head.in_features == classifier(source).in_features
        head_name = next(n for n, m in model.named_modules() if m is head)
        wanted = source.state_dict()
        for key, value in model.state_dict().items():
            if not key.startswith((f"{name}.", f"{head_name}.")):
                assert torch.equal(value, wanted[key]), key
        seen = {}
        conv.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0]))  # noqa: B023 (this pass)
        head.register_forward_hook(lambda m, args, out: seen.setdefault("output", out))  # noqa: B023 (this pass)
        x = torch.randn(2, 3 * slices, 64, 64)
        with torch.no_grad():
            out = model(x)
        # The widened conv is the one that reads the input, and the head's output is the model's output.
        assert out.shape == (2, 5)
        assert torch.equal(seen["input"], x)
        assert torch.equal(seen["output"], out)


@pytest.mark.parametrize("arch", ["densenet121", "efficientnet_b0", "convnext_tiny"])
def test_head_of_another_size_is_dropped_whatever_its_name(arch, tmp_path):
    _saved(torchvision.models.get_model(arch, weights=None, num_classes=10), tmp_path / "w.pth")
    assert classifier(build_model(arch, n_outputs=1, pretrained=tmp_path / "w.pth")).out_features == 1


@pytest.mark.parametrize(
    "arch, other",
    [
        ("densenet121", "densenet169"),
        ("efficientnet_b0", "efficientnet_b1"),
        ("mobilenet_v3_small", "mobilenet_v3_large"),
        ("convnext_tiny", "resnet18"),
    ],
)
def test_weights_of_another_arch_are_refused_in_every_family(arch, other, tmp_path):
    _saved(torchvision.models.get_model(other, weights=None), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"does not fit this architecture: .*weights file of the same --arch\?"):
        build_model(arch, pretrained=tmp_path / "w.pth")


def test_widening_keeps_the_first_conv_bias_and_geometry():
    model = torchvision.models.convnext_tiny()
    old = model.features[0][0]
    widen_input(model, windows=2, slices=5)
    new = model.features[0][0]
    assert new.in_channels == 10
    assert new is not old
    assert torch.equal(new.bias, old.bias)
    assert (new.kernel_size, new.stride, new.padding) == (old.kernel_size, old.stride, old.padding)
    for c in range(10):
        torch.testing.assert_close(new.weight[:, c], old.weight[:, c % 2] * 3 / 10)
