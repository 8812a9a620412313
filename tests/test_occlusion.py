"""Incremental occlusion: the same maps as Captum's Occlusion, at a fraction of the compute."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from pneumonia.explain import occlusion
from pneumonia.explain.attribution import Probabilities, occlusion_map
from pneumonia.explain.occlusion import (
    Counter,
    Engine,
    checkerboard,
    engine_passes,
    fill_in,
    incremental_occlusion_map,
    saves_work,
    trace,
    window_starts,
)
from pneumonia.models import build_network


@pytest.fixture(autouse=True)
def seeded():
    """Random networks built the same way every run: an fp32 map of a sharply aimed classifier
    differs from Captum's by rounding, and a few random networks amplify it past 1e-5 (seeds 15,
    17 and 30 of the small sequential network: 1.1e-5 to 4.5e-5, and 1.5e-8 in float64)."""
    torch.manual_seed(0)


def captum_map(net: nn.Module, images: torch.Tensor, target: torch.Tensor, window: int,
               stride: int, baseline: float) -> torch.Tensor:
    with torch.no_grad():
        return Occlusion(Probabilities(net)).attribute(
            images, sliding_window_shapes=(1, window, window), strides=(1, stride, stride),
            baselines=baseline, target=target, perturbations_per_eval=32)[:, 0]


def assert_matches_captum(net: nn.Module, size: int, window: int, stride: int, images: int = 1,
                          dtype: torch.dtype = torch.float32, sharpness: float = 1.0) -> Counter:
    """The incremental map equals Captum's to 1e-5 and is not trivially small; returns its cost."""
    torch.manual_seed(1)
    net = net.eval().to(dtype)
    x, target = torch.randn(images, 1, size, size, dtype=dtype), torch.arange(images) % 2
    aim_classifier(net, x, 0.3, sharpness)
    counter = Counter()
    got = incremental_occlusion_map(net, x, target, window, stride, 0.3, 16, counter=counter)
    want = captum_map(net, x, target, window, stride, 0.3)
    assert got is not None, "the network should trace"
    assert want.abs().max() > 50 * 1e-5, "a map this flat proves little"
    torch.testing.assert_close(got.to(want.dtype), want, atol=1e-5, rtol=0)  # Captum: fp32 out
    return counter


def aim_classifier(net: nn.Module, x: torch.Tensor, baseline: float, sharpness: float) -> None:
    """Points the last linear layer at what occluding the image's top-left quarter changes in
    its input features (the logit moves by `sharpness`) and sets its bias so that image sits at
    p = 0.5: random weights give maps too flat or too saturated to tell exact from nearly exact.
    Sharper classifiers amplify rounding too: Captum's fp32 maps of a VGG16 aimed with
    sharpness 4 differ from themselves by 2e-4 between 32 and 1 copies per pass."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    features = []
    hook = last.register_forward_hook(lambda m, args, out: features.append(args[0]))
    occluded = x[:1].clone()
    occluded[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = baseline
    with torch.no_grad():
        net(torch.cat([x[:1], occluded]))
        hook.remove()
        change = features[0][0] - features[0][1]
        last.weight.zero_()
        last.weight[1] = sharpness * change / change.square().sum()
        last.bias.zero_()
        logits = net(x[:1])[0]
        last.bias -= logits - logits.mean()


def conv_bn(c_in: int, c_out: int, **kw) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, bias=False, **kw), nn.BatchNorm2d(c_out)]


def randomise_bn(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so eval-mode BatchNorm really transforms."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def head(channels: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2)]


def sequential_net() -> nn.Module:
    """Every sliding-window layer kind and setting: padding, stride, dilation, groups."""
    return randomise_bn(nn.Sequential(
        *conv_bn(1, 8, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        *conv_bn(8, 8, padding=2, dilation=2, groups=4), nn.SiLU(),
        *conv_bn(8, 8, padding=1, stride=2, groups=8), nn.Hardswish(),  # depthwise, strided
        nn.AvgPool2d(2), nn.Conv2d(8, 12, 1), nn.GELU(),
        nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(12, 12, 5, padding=1), nn.ReLU6(),
        *head(12),
    ))


class Residual(nn.Module):
    """ResNet-like: a strided branch added to a 1x1 strided shortcut, then an identity block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 8, padding=1), nn.ReLU())
        self.branch = nn.Sequential(*conv_bn(8, 16, stride=2, padding=1), nn.ReLU(),
                                    *conv_bn(16, 16, padding=1))
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.block = nn.Sequential(*conv_bn(16, 16, padding=1), nn.ReLU())
        self.head = nn.Sequential(*head(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.branch(x) + self.shortcut(x))
        return self.head(x + self.block(x))


class Dense(nn.Module):
    """DenseNet-like: features concatenated along channels, then a transition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.layer1 = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
        self.layer2 = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 4, 3, padding=1))
        self.transition = nn.Sequential(nn.Conv2d(14, 8, 1), nn.AvgPool2d(2, 2))
        self.head = nn.Sequential(*head(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.layer1(x)], 1)
        x = torch.cat([x, self.layer2(x)], dim=1)
        return self.head(self.transition(x))


class SqueezeExcite(nn.Module):
    """A block whose gate depends on the whole map: everything after it changes everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), *head(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        gate = self.expand(self.reduce(x.mean((2, 3), keepdim=True)).relu()).sigmoid()
        return self.tail(x * gate)


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3))) * 5


def test_window_positions_are_captums_with_the_last_one_crossing_the_border():
    assert window_starts(37, 8, 5) == [0, 5, 10, 15, 20, 25, 30]  # 30..37 is clipped to 30..36
    assert window_starts(32, 8, 8) == [0, 8, 16, 24]
    assert window_starts(9, 9, 4) == [0]
    with pytest.raises(ValueError):
        window_starts(8, 9, 1)


@pytest.mark.parametrize("size,window,stride", [(37, 8, 5), (32, 7, 3), (41, 9, 9), (29, 6, 2)])
def test_sequential_conv_pool_network_matches_captum(size, window, stride):
    counter = assert_matches_captum(sequential_net(), size, window, stride, images=2)
    assert counter.per_copy() < counter.full_pass  # it did recompute only part of the network


@pytest.mark.parametrize("net", [Residual, Dense], ids=["residual_add", "concat"])
@pytest.mark.parametrize("size,window,stride", [(37, 8, 5), (48, 11, 7)])
def test_residual_and_concatenating_networks_match_captum(net, size, window, stride):
    counter = assert_matches_captum(randomise_bn(net()), size, window, stride)
    assert counter.per_copy() < 0.8 * counter.full_pass


def test_a_convolution_covering_its_whole_input_runs_as_a_product_and_stays_exact(monkeypatch):
    """VGG's head: a convolution whose kernel is the whole map, then a 1x1 one on one position
    (its changed 1x1 output was once read as the unoccluded one by the next pointwise layer)."""
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                        nn.Linear(16, 2))
    covered, covers = [], occlusion.covers_input
    monkeypatch.setattr(occlusion, "covers_input",
                        lambda m, x: covered.append(covers(m, x)) or covered[-1])
    assert_matches_captum(net, 32, 6, 4)
    assert covered.count(True) >= 2 * (1 + 36 // 16)  # both head convolutions, base and batches
    assert not any("forward" in vars(m) for m in net.modules())  # the modules are given back


def test_squeeze_excitation_computes_full_maps_after_the_gate_and_stays_exact():
    counter = assert_matches_captum(SqueezeExcite(), 35, 9, 6)
    tail = 8 * 8 * 9 * 35 * 35 + 16  # the 3x3 conv after the gate, plus the linear layer
    assert counter.per_copy() >= tail


def test_a_network_that_mixes_the_whole_map_after_its_stem_runs_captum(monkeypatch):
    """By the engine's own count a gate right after the stem leaves too little to save
    (under MIN_SAVING), so occlusion_map runs whole passes; a network without one keeps the
    engine."""
    x, target = torch.randn(1, 1, 35, 35), torch.tensor([1])
    gated, plain = SqueezeExcite().eval(), randomise_bn(sequential_net()).eval()
    assert saves_work(plain, x, 9, 6, 16) and not saves_work(gated, x, 9, 6, 16)

    def engine(*args, **kwargs):
        raise AssertionError("the engine should not run for this network")

    monkeypatch.setattr("pneumonia.explain.attribution.incremental_occlusion_map", engine)
    torch.testing.assert_close(occlusion_map(gated, x, target, 9, 6, 0.0, 16),
                               captum_map(gated, x, target, 9, 6, 0.0), atol=1e-6, rtol=0)


def test_untraceable_network_falls_back_to_captum():
    torch.manual_seed(0)
    net = DataDependent().eval()
    x, target = torch.randn(2, 1, 24, 24), torch.tensor([1, 0])
    assert trace(net) is None
    assert incremental_occlusion_map(net, x, target, 7, 4, 0.0) is None
    torch.testing.assert_close(occlusion_map(net, x, target, 7, 4, 0.0),
                               captum_map(net, x, target, 7, 4, 0.0), atol=1e-6, rtol=0)


def test_drilldown_computes_a_checkerboard_and_the_largest_filled_in_windows():
    torch.manual_seed(0)
    net = randomise_bn(sequential_net()).eval()
    x, target = torch.randn(1, 1, 64, 64), torch.tensor([1])
    aim_classifier(net, x, 0.0, 1.0)
    exact = incremental_occlusion_map(net, x, target, 9, 4, 0.0)
    positions = len(window_starts(64, 9, 4)) ** 2  # 15 x 15: 113 on the checkerboard, 112 not
    for refine, copies in ((0.0, 113), (0.25, 113 + 28), (1.0, positions)):
        counter = Counter()
        got = incremental_occlusion_map(net, x, target, 9, 4, 0.0, mode="approximate",
                                        refine=refine, counter=counter)
        assert counter.copies == copies
        if refine == 1.0:  # every window computed: the exact map
            torch.testing.assert_close(got, exact, atol=1e-6, rtol=0)
        else:  # it really approximates, and closely (this net's map is smooth)
            assert not torch.allclose(got, exact, atol=1e-5)
            assert torch.corrcoef(torch.stack([got.flatten(), exact.flatten()]))[0, 1] > 0.9
    with pytest.raises(ValueError, match="mode"):
        incremental_occlusion_map(net, x, target, 9, 4, 0.0, mode="fast")
    with pytest.raises(ValueError, match="refine"):
        incremental_occlusion_map(net, x, target, 9, 4, 0.0, mode="approximate", refine=1.5)


def test_drilldown_fills_each_window_in_with_its_computed_neighbours_mean():
    known = checkerboard(3, 4)
    assert known.tolist() == [[True, False, True, False], [False, True, False, True],
                              [True, False, True, False]]
    grid = torch.arange(12, dtype=torch.float64).view(3, 4)
    filled = fill_in(grid, known)
    assert torch.equal(filled[known], grid[known])
    assert filled[0, 1] == (0 + 2 + 5) / 3 and filled[0, 3] == (2 + 7) / 2  # border: fewer
    assert filled[1, 2] == (2 + 5 + 7 + 10) / 4


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "resnet18", "densenet121", "mobilenetv3_large_100",
                                      "efficientnet_b0", "tf_efficientnet_lite0"])
def test_configured_timm_backbones_match_captum(backbone):
    """In float64, so that a sharp classifier tests the engine and not fp32 rounding."""
    # seeded: some random VGG16s (seed 0's) have features that occluding the quarter leaves
    # unchanged, and aiming the classifier at that change divides 0 by 0 (NaN maps)
    torch.manual_seed(1)
    net = build_network(backbone, pretrained=False, input_size=64)
    # 4 x 4 windows of 20 px, the last ones clipped at the border
    assert_matches_captum(net, 64, 20, 20, dtype=torch.float64, sharpness=4.0)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "resnet18", "densenet121", "mobilenetv3_large_100",
                                      "efficientnet_b0", "tf_efficientnet_lite0"])
def test_configured_backbones_at_224_give_each_occluded_copy_its_full_pass_probabilities(backbone):
    """At the product's geometry (224 px, window 15), where a whole Captum map is too slow for a
    test: copies occluded at the corners (the last windows cross the border), the edges and
    inside, through the engine, against full passes of the same occluded images (fp32)."""
    net = build_network(backbone, pretrained=False, input_size=224).eval()
    x = torch.randn(1, 1, 224, 224)
    aim_classifier(net, x, 0.0, 1.0)
    last = window_starts(224, 15, 10)[-1]  # 210: its window is clipped to 210..223
    starts = [(0, 0), (0, last), (last, 0), (last, last), (100, 110), (50, last), (120, 30)]
    occluded = x.repeat(len(starts), 1, 1, 1)
    for copy, (row, col) in enumerate(starts):
        occluded[copy, :, row:row + 15, col:col + 15] = 0.0
    with torch.no_grad():
        want, unoccluded = net(occluded).softmax(1), net(x).softmax(1)
    engine = Engine(trace(net))
    with engine_passes(net):
        got = engine.run_copies(engine.run_base(x), starts, 15, 0.0).softmax(1)
    assert (want - unoccluded).abs().max() > 50 * 1e-5, "occlusion changed nothing: proves little"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_residual_network_on_the_gpu_matches_captum():
    net = randomise_bn(Residual()).eval().cuda()
    torch.manual_seed(1)
    x, target = torch.randn(1, 1, 37, 37, device="cuda"), torch.tensor([1], device="cuda")
    aim_classifier(net, x, 0.3, 1.0)
    got = incremental_occlusion_map(net, x, target, 8, 5, 0.3)
    torch.testing.assert_close(got, captum_map(net, x, target, 8, 5, 0.3), atol=1e-5, rtol=0)
