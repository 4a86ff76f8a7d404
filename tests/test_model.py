from __future__ import annotations

import pickle

import pytest
import torch
import torchvision

from ichtrain.errors import CheckpointError, ConfigError
from ichtrain.model import build_model, load_state_dict, widen_input


def test_default_resnet152_forward_and_one_step():
    model = build_model("resnet152", n_outputs=6)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 6 and model.conv1.in_channels == 3
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[0, 0, 0, 1, 0, 1], [0] * 6], dtype=torch.float32)
    before = model.fc.weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)


def test_unknown_arch_lists_choices():
    with pytest.raises(ConfigError, match="unknown arch 'vgg16'; choose one of resnet18, resnet34, resnet50"):
        build_model("vgg16")


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
    torch.testing.assert_close(model.conv1(x.repeat(1, 3, 1, 1)), torch.nn.functional.conv2d(x, rgb, stride=2, padding=3))


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
