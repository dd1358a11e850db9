"""FCN-32s/16s/8s: sizes, the paper's initialisations, and the light backbones.

The 134M-parameter VGG16 nets are built once per module and only ever see small inputs,
so the whole file stays within a few seconds of CPU per test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fcn_core.models import (
    FCN,
    FCN8s,
    FCN16s,
    FCN32s,
    bilinear_kernel,
    build_model,
    efficientnet_lite0_imagenet,
    grouped_upsampling,
)
from fcn_core.models.backbones import VGG16Caffe, load_in_order
from fcn_core.preprocess import HALF_RGB

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHS = ("fcn32s", "fcn16s", "fcn8s")
LITE = "efficientnet_lite0"
MOBILE = "mobilenet_v2"

# The paper's VGG16 (Simonyan & Zisserman, config D), written out independently of the code.
VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
VGG16_CONVS += [(256, 512)] + [(512, 512)] * 5


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def expected_counts(stride: int, c: int, channels: tuple[int, int, int]) -> tuple[int, int]:
    """(head parameters, of which frozen) from the layer shapes of the skip head: 1x1 score
    layers with bias, and bias-free C->C deconvolutions with kernel 2 x factor."""
    c3, c4, c_top = channels
    head = conv_params(c_top, c, 1)
    factors = {32: [32], 16: [2, 16], 8: [2, 2, 8]}[stride]
    if stride <= 16:
        head += conv_params(c4, c, 1)
    if stride == 8:
        head += conv_params(c3, c, 1)
    frozen = sum(conv_params(c, c, 2 * f, bias=False) for f in factors)
    return head + frozen, frozen


def vgg16_backbone_params() -> int:
    convs = sum(conv_params(i, o, 3) for i, o in VGG16_CONVS)
    return convs + conv_params(512, 4096, 7) + conv_params(4096, 4096, 1)  # fc6, fc7


def count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if not p.requires_grad)


def randomise_scores(model: nn.Module, seed: int = 0) -> nn.Module:
    """Score layers start at zero (paper); random ones make the outputs carry information."""
    torch.manual_seed(seed)
    for name, module in model.named_modules():
        if name.startswith("score"):
            nn.init.normal_(module.weight, std=0.05)
            nn.init.normal_(module.bias, std=0.5)
    return model


@pytest.fixture(scope="module")
def vgg() -> dict[str, FCN]:
    return {arch: build_model(arch, 21, "vgg16").eval() for arch in ARCHS}


# --- sizes -----------------------------------------------------------------------------------


def test_fcn8s_vgg16_has_the_papers_parameter_count(vgg: dict[str, FCN]) -> None:
    total, frozen = count(vgg["fcn8s"])
    assert total == 134_489_759
    assert frozen == 127_008
    head, head_frozen = expected_counts(8, 21, (256, 512, 4096))
    assert (total, frozen) == (vgg16_backbone_params() + head, head_frozen)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [21, 11])
def test_vgg16_parameter_counts_follow_the_layer_shapes(
    vgg: dict[str, FCN], arch: str, num_classes: int
) -> None:
    if num_classes == 21:
        model = vgg[arch]
    else:
        with torch.device("meta"):  # shapes only: no 134M-float initialisation
            model = build_model(arch, num_classes, "vgg16")
    head, frozen = expected_counts(model.stride, num_classes, (256, 512, 4096))
    assert count(model) == (vgg16_backbone_params() + head, frozen)
    deconvs = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert sum(m.weight.numel() for m in deconvs) == frozen


@pytest.mark.parametrize("arch", ARCHS)
def test_lite0_head_parameter_counts_follow_the_layer_shapes(arch: str) -> None:
    model = build_model(arch, 11, LITE)
    head, frozen = expected_counts(model.stride, 11, (40, 112, 1280))
    backbone_total, backbone_frozen = count(model.backbone)
    assert backbone_frozen == 0
    assert count(model) == (backbone_total + head, frozen)


SIZES = [(2, 1, 1), (1, 5, 7), (2, 33, 17), (1, 97, 131)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("n", "h", "w"), SIZES)
def test_vgg16_output_is_exactly_input_size(
    vgg: dict[str, FCN], arch: str, n: int, h: int, w: int
) -> None:
    with torch.no_grad():
        out = vgg[arch](torch.randn(n, 3, h, w))
    assert out.shape == (n, 21, h, w)


@pytest.mark.parametrize("backbone", [LITE, MOBILE])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("n", "h", "w"), [*SIZES, (1, 64, 96), (1, 360, 480)])
def test_light_backbone_output_is_exactly_input_size(
    backbone: str, arch: str, n: int, h: int, w: int
) -> None:
    model = build_model(arch, 11, backbone).eval()
    with torch.no_grad():
        out = model(torch.randn(n, 3, h, w))
    assert out.shape == (n, 11, h, w)


def test_mobilenet_v2_taps_and_deeplab_head() -> None:
    """Taps at strides 8 / 16 / 32 with the contract's channels; the top is DeepLabV3's head,
    whose image-pooling branch is the same at every position (the global mean's answer)."""
    net = build_model("fcn8s", 21, MOBILE).backbone.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        pool3, pool4, top = net(x)
        pooled = net.image_pooling(net.features(x).mean((2, 3), True))
        # with the 1x1 branch silenced, what is left is the pooled branch: one vector per image
        net.aspp0[0].weight.zero_()
        net.aspp0[1].bias.fill_(-1e3)
        _, _, pooled_only = net(x)
    assert [t.shape[1:] for t in (pool3, pool4, top)] == [
        (32, 12, 16),
        (96, 6, 8),
        (256, 3, 4),
    ]
    assert net.channels == (32, 96, 256)
    assert pooled.shape == (2, 256, 1, 1)
    assert torch.equal(pooled_only, pooled_only[..., :1, :1].expand_as(pooled_only))
    assert not torch.equal(pooled_only[0], pooled_only[1])
    assert sum(p.numel() for p in build_model("fcn8s", 21, MOBILE).parameters()) < 2_500_000


def test_unknown_arch_or_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'fcn4s'"):
        build_model("fcn4s")
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        build_model("fcn8s", 21, "resnet50")


# --- bilinear upsampling ---------------------------------------------------------------------

KERNEL_4 = torch.tensor(
    [
        [0.0625, 0.1875, 0.1875, 0.0625],
        [0.1875, 0.5625, 0.5625, 0.1875],
        [0.1875, 0.5625, 0.5625, 0.1875],
        [0.0625, 0.1875, 0.1875, 0.0625],
    ]
)


def test_bilinear_kernel_matches_hand_computed_values() -> None:
    weight = bilinear_kernel(3, 3, 4)
    assert weight.shape == (3, 3, 4, 4)
    for i in range(3):
        for j in range(3):
            expected = KERNEL_4 if i == j else torch.zeros(4, 4)
            torch.testing.assert_close(weight[i, j], expected, rtol=0, atol=1e-7)
    # Odd size: centred on the middle tap, 1 - |x - 1| / 2 -> [0.5, 1, 0.5].
    odd = torch.tensor([0.5, 1.0, 0.5])
    torch.testing.assert_close(bilinear_kernel(1, 1, 3)[0, 0], odd[:, None] * odd[None, :])


@pytest.mark.parametrize("backbone", ["vgg16", LITE])
def test_deconvolutions_are_frozen_diagonal_bilinear(vgg: dict[str, FCN], backbone: str) -> None:
    model = vgg["fcn8s"] if backbone == "vgg16" else build_model("fcn8s", 11, LITE)
    c = model.num_classes
    deconvs = {n: m for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)}
    assert set(deconvs) == {"upscore2", "upscore_pool4", "upscore8"}
    for name, deconv in deconvs.items():
        k = deconv.kernel_size[0]
        assert deconv.stride[0] * 2 == k, name
        assert deconv.bias is None
        assert not deconv.weight.requires_grad, f"{name} should be frozen by default"
        assert torch.equal(deconv.weight, bilinear_kernel(c, c, k))


def test_learnable_upsampling_unfreezes_and_trains_the_deconvolutions() -> None:
    frozen = build_model("fcn8s", 4, LITE)
    learnable = build_model("fcn8s", 4, LITE, learnable_upsampling=True)
    for model in (frozen, learnable):
        randomise_scores(model)
        model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        assert getattr(learnable, name).weight.requires_grad
        assert getattr(learnable, name).weight.grad.abs().sum() > 0
        assert getattr(frozen, name).weight.grad is None


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_upsampling_serves_the_same_net_with_one_filter_per_class(arch: str) -> None:
    model = build_model(arch, 5, LITE).eval()
    randomise_scores(model)
    served = grouped_upsampling(model)
    deconvs = [n for n, m in model.named_children() if isinstance(m, nn.ConvTranspose2d)]
    for name in deconvs:
        assert getattr(served, name).groups == 5
        assert getattr(served, name).weight.shape == (5, 1, *getattr(model, name).kernel_size)
        assert getattr(model, name).groups == 1, "the original keeps its dense layers"
    assert served.backbone is model.backbone
    assert set(model.state_dict()) == set(served.state_dict())
    x = torch.randn(2, 3, 70, 90)
    with torch.inference_mode():
        dense, grouped = model(x), served(x)
    torch.testing.assert_close(grouped, dense, rtol=0, atol=1e-5)
    assert torch.equal(grouped.max(1).indices, dense.max(1).indices)
    assert grouped_upsampling(served) is served


@pytest.mark.parametrize(("factor", "padding"), [(2, 1), (8, 4), (2, 0), (32, 0)])
def test_grouped_deconvolution_equals_the_dense_one_for_both_geometries(
    factor: int, padding: int
) -> None:
    """Lite0's padded layers and the reference VGG16's unpadded ones (padding 0)."""
    from fcn_core.models.fcn import _diagonal_kernels, _grouped
    from fcn_core.models.init import bilinear_deconv

    dense = bilinear_deconv(6, factor, padding)
    grouped = _grouped(dense, _diagonal_kernels(dense))
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), dense(x), rtol=0, atol=1e-5)


def test_grouped_upsampling_leaves_learned_deconvolutions_and_other_modules() -> None:
    learned = build_model("fcn8s", 4, LITE, learnable_upsampling=True)
    with torch.no_grad():
        learned.upscore8.weight[0, 1] += 0.5  # class 1 now feeds class 0: not diagonal
    served = grouped_upsampling(learned)
    assert served.upscore8 is learned.upscore8
    assert served.upscore2.groups == 4  # still diagonal, so grouped
    other = nn.Sequential(nn.ConvTranspose2d(3, 3, 4, 2, bias=False))
    assert grouped_upsampling(other) is other


def ramps(channels: int, h: int, w: int) -> torch.Tensor:
    """A different smooth (affine) ramp per channel, so cross-channel mixing would show."""
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([(c + 1) * xx - 0.5 * c * yy + c for c in range(channels)])[None]


@pytest.mark.parametrize("name", ["upscore2", "upscore8"])
def test_frozen_upscore_reproduces_bilinear_upsampling_in_the_interior(name: str) -> None:
    """Lite0's padded deconvolutions are exactly 2x / 8x bilinear (align_corners=False) away
    from the border; the reference VGG16's unpadded ones give the same map shifted by f/2."""
    lite = build_model("fcn8s", 5, LITE)
    deconv = getattr(lite, name)
    f = deconv.stride[0]
    x = ramps(5, 6, 7)
    expected = F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)
    with torch.no_grad():
        got = deconv(x)
    assert got.shape == expected.shape
    inner = (..., slice(f, -f), slice(f, -f))
    torch.testing.assert_close(got[inner], expected[inner], rtol=0, atol=1e-4)
    # The border does differ (the deconvolution sees zero padding): only the interior matches.
    assert not torch.allclose(got[..., :1, :], expected[..., :1, :])

    unpadded = nn.ConvTranspose2d(5, 5, 2 * f, stride=f, bias=False)
    with torch.no_grad():
        unpadded.weight.copy_(deconv.weight)
        shifted = unpadded(x)[..., f // 2 : f // 2 + 6 * f, f // 2 : f // 2 + 7 * f]
    torch.testing.assert_close(shifted[inner], expected[inner], rtol=0, atol=1e-4)


def test_vgg16_upscore8_reproduces_shifted_bilinear_upsampling(vgg: dict[str, FCN]) -> None:
    deconv = vgg["fcn8s"].upscore8
    assert deconv.padding == (0, 0)
    x = ramps(21, 5, 6)
    with torch.no_grad():
        got = deconv(x)[..., 4 : 4 + 40, 4 : 4 + 48]
    expected = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[..., 8:-8, 8:-8], expected[..., 8:-8, 8:-8], rtol=0, atol=1e-3)


# --- reference geometry ----------------------------------------------------------------------


def test_vgg16_matches_the_reference_caffe_net(vgg: dict[str, FCN]) -> None:
    net = vgg["fcn8s"].backbone
    assert isinstance(net, VGG16Caffe)
    convs = net.convs()
    assert [(c.in_channels, c.out_channels) for c in convs] == VGG16_CONVS
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert convs[0].padding == (100, 100)
    assert all(c.padding == (1, 1) for c in convs[1:])
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(p.ceil_mode and p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert (net.fc6.in_channels, net.fc6.out_channels, net.fc6.kernel_size) == (512, 4096, (7, 7))
    assert (net.fc7.in_channels, net.fc7.out_channels, net.fc7.kernel_size) == (4096, 4096, (1, 1))
    geo = VGG16Caffe.geometry
    assert (geo.pool4_offset, geo.pool3_offset) == (5, 9)
    assert geo.final_offset == {32: 19, 16: 27, 8: 31}
    assert not geo.deconv_padding and geo.pad_to == 1


def test_vgg16_taps_have_the_reference_sizes(vgg: dict[str, FCN]) -> None:
    """conv1_1 turns a 1x1 input into 199x199 (padding 100, 3x3 kernel); ceil-mode pooling
    then gives 100, 50, pool3 25, pool4 13, pool5 7, and fc6 (7x7, unpadded) one position.
    Floor-mode pooling would end at pool5 6, too small for fc6."""
    with torch.no_grad():
        pool3, pool4, fc7 = vgg["fcn8s"].backbone(torch.randn(1, 3, 1, 1))
    assert pool3.shape[-2:] == (25, 25)
    assert pool4.shape[-2:] == (13, 13)
    assert fc7.shape[-3:] == (4096, 1, 1)


# --- at-once scaling --------------------------------------------------------------------------


def capture_inputs(model: FCN) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output) -> None:
            seen[name] = output if name == "backbone" else args[0]

        return hook

    for name in ("backbone", "score_pool4", "score_pool3"):
        getattr(model, name).register_forward_hook(keep(name))
    return seen


def test_at_once_scales_pool4_and_pool3_before_scoring() -> None:
    at_once = randomise_scores(build_model("fcn8s", 6, LITE, at_once=True)).eval()
    staged = build_model("fcn8s", 6, LITE).eval()
    staged.load_state_dict(at_once.state_dict())
    x = torch.randn(1, 3, 64, 96)
    a_seen, s_seen = capture_inputs(at_once), capture_inputs(staged)
    with torch.no_grad():
        out = at_once(x)
        plain = staged(x)
    pool3, pool4, top = a_seen["backbone"]
    torch.testing.assert_close(a_seen["score_pool4"], pool4 * 0.01, rtol=0, atol=0)
    torch.testing.assert_close(a_seen["score_pool3"], pool3 * 1e-4, rtol=0, atol=0)
    torch.testing.assert_close(s_seen["score_pool4"], pool4, rtol=0, atol=0)
    torch.testing.assert_close(s_seen["score_pool3"], pool3, rtol=0, atol=0)
    # The whole forward by hand, from the backbone's taps.
    with torch.no_grad():
        s = at_once.upscore2(at_once.score_fr(top)) + at_once.score_pool4(0.01 * pool4)
        s = at_once.upscore_pool4(s) + at_once.score_pool3(1e-4 * pool3)
        manual = at_once.upscore8(s)
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    assert (out - plain).abs().max() > 1e-2


# --- staged initialisation --------------------------------------------------------------------


def test_staged_init_copies_shared_layers_and_zeroes_the_new_skip() -> None:
    fcn32 = randomise_scores(build_model("fcn32s", 5, LITE)).eval()
    fcn16 = FCN16s.from_fcn32s(fcn32).eval()
    fcn8 = FCN8s.from_fcn16s(fcn16).eval()
    assert isinstance(fcn16, FCN16s) and isinstance(fcn8, FCN8s)
    for coarse, fine, new in ((fcn32, fcn16, "score_pool4"), (fcn16, fcn8, "score_pool3")):
        own = fine.state_dict()
        shared = [k for k in coarse.state_dict() if k in own]
        assert {k for k in shared if k.startswith("backbone.")} == {
            k for k in own if k.startswith("backbone.")
        }
        assert "score_fr.weight" in shared
        for k in shared:
            assert torch.equal(own[k], coarse.state_dict()[k]), k
        assert not getattr(fine, new).weight.any() and not getattr(fine, new).bias.any()
    assert torch.equal(fcn8.score_pool4.weight, fcn32.score_fr.weight.new_zeros(5, 112, 1, 1))


def test_staged_nets_start_out_predicting_what_the_coarser_net_did() -> None:
    fcn32 = randomise_scores(build_model("fcn32s", 5, LITE)).eval()
    fcn16 = FCN16s.from_fcn32s(fcn32).eval()
    fcn8 = FCN8s.from_fcn16s(fcn16).eval()
    x = torch.randn(1, 3, 96, 128)
    skips: dict[str, torch.Tensor] = {}
    fcn16.score_pool4.register_forward_hook(lambda m, a, o: skips.__setitem__("pool4", o))
    fcn8.score_pool3.register_forward_hook(lambda m, a, o: skips.__setitem__("pool3", o))
    coarse_scores: list[torch.Tensor] = []
    fcn32.score_fr.register_forward_hook(lambda m, a, o: coarse_scores.append(o))
    with torch.no_grad():
        out32, out16, out8 = fcn32(x), fcn16(x), fcn8(x)
        # Zero skips contribute exactly nothing: 16s is 32s's score_fr through 2x then 16x.
        assert skips["pool4"].abs().max() == 0 and skips["pool3"].abs().max() == 0
        via16 = fcn16.upscore16(fcn16.upscore2(coarse_scores[0]))
        via8 = fcn8.upscore8(fcn8.upscore_pool4(fcn8.upscore2(coarse_scores[0])))
    torch.testing.assert_close(out16, via16, rtol=0, atol=1e-6)
    torch.testing.assert_close(out8, via8, rtol=0, atol=1e-6)
    # Up to the difference between one 32x bilinear step and 2x + 16x ones, the same map.
    for finer in (out16, out8):
        assert (finer - out32).abs().mean() < 0.15 * out32.std()
        assert (finer.argmax(1) == out32.argmax(1)).float().mean() > 0.95


def test_staged_init_passes_options_and_refuses_a_finer_source() -> None:
    fcn32 = build_model("fcn32s", 3, LITE, at_once=True)
    fcn16 = FCN16s.from_fcn32s(fcn32, learnable_upsampling=True)
    assert fcn16.at_once and fcn16.upscore2.weight.requires_grad
    assert not FCN16s.from_fcn32s(fcn32, at_once=False).at_once  # an explicit choice wins
    with pytest.raises(ValueError, match="coarser net"):
        FCN32s.from_coarser(fcn16)
    with pytest.raises(ValueError, match="coarser net"):
        FCN16s.from_coarser(fcn16)


# --- ImageNet backbones, offline ---------------------------------------------------------------


def fake_torchvision_vgg16() -> dict[str, torch.Tensor]:
    """torchvision's VGG16 state dict layout (keys and shapes) filled with random numbers."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        shapes = vgg16().state_dict()
    gen = torch.Generator().manual_seed(0)
    return {k: torch.empty(v.shape).uniform_(-0.01, 0.01, generator=gen) for k, v in shapes.items()}


def test_pretrained_vgg16_loads_offline_with_fc6_fc7_convolutionalised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import VGG16_Weights

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    source = fake_torchvision_vgg16()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source, checkpoints / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])

    model = build_model("fcn8s", 21, "vgg16", pretrained=True).eval()
    net = model.backbone
    conv_indices = sorted({int(k.split(".")[1]) for k in source if k.startswith("features.")})
    assert len(conv_indices) == 13
    for idx, conv in zip(conv_indices, net.convs(), strict=True):
        assert torch.equal(conv.weight, source[f"features.{idx}.weight"])
        assert torch.equal(conv.bias, source[f"features.{idx}.bias"])
    pool5 = torch.randn(2, 512, 7, 7)
    hidden = torch.randn(2, 4096, 1, 1)
    with torch.no_grad():
        as_fc6 = F.linear(
            pool5.flatten(1), source["classifier.0.weight"], source["classifier.0.bias"]
        )
        as_fc7 = F.linear(
            hidden.flatten(1), source["classifier.3.weight"], source["classifier.3.bias"]
        )
        # The same numbers, summed in another order: a 7x7x512 convolution against a
        # 25,088-long dot product differ by float32 rounding (2e-5 seen without AVX-512).
        torch.testing.assert_close(net.fc6(pool5).flatten(1), as_fc6, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net.fc7(hidden).flatten(1), as_fc7, rtol=1e-4, atol=1e-4)
    # Score layers are new: still zero after loading the ImageNet trunk.
    assert not model.score_fr.weight.any()


def test_pretrained_mobilenet_v2_trunk_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's ImageNet MobileNetV2 (downloaded once for real users), read here from
    the local checkpoint: its first 18 feature layers become the trunk; the head is new."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    source = mobilenet_v2().state_dict()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source, checkpoints / MobileNet_V2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])

    model = build_model("fcn8s", 21, MOBILE, pretrained=True)
    trunk = model.backbone.features.state_dict()
    assert len(trunk) > 200
    for key, tensor in trunk.items():
        assert torch.equal(tensor, source[f"features.{key}"]), key
    assert not model.score_fr.weight.any()


@pytest.fixture(scope="module")
def lite0_imagenet() -> nn.Module:
    return efficientnet_lite0_imagenet().eval()


def classify(model: nn.Module, image: Image.Image) -> tuple[int, float]:
    rgb = np.array(image.convert("RGB").resize((224, 224), Image.BICUBIC))
    x = HALF_RGB(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    return int(probs.argmax()), float(probs.max())


def test_lite0_imagenet_recognises_a_cat(lite0_imagenet: nn.Module) -> None:
    from skimage import data

    label, prob = classify(lite0_imagenet, Image.fromarray(data.chelsea()))
    assert 281 <= label <= 285, f"chelsea classified as ImageNet class {label}"
    assert prob > 0.3


def test_lite0_imagenet_recognises_a_dog(lite0_imagenet: nn.Module) -> None:
    path = SHARED / "demo-photos" / "dog.jpg"
    if not path.is_file():
        pytest.skip(f"demo photo not found at {path}")
    with Image.open(path) as im:
        label, prob = classify(lite0_imagenet, im)
    assert 151 <= label <= 268, f"dog.jpg classified as ImageNet class {label}"
    assert prob > 0.2


def test_load_in_order_refuses_mismatched_checkpoints() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    good = {f"src{i}": torch.randn(v.shape) for i, v in enumerate(model.state_dict().values())}
    load_in_order(model, good)
    assert torch.equal(model[1].bias, good["src3"])
    bad = dict(good, src2=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"shape mismatch mapping src2 \(2, 4\) -> 1\.weight"):
        load_in_order(model, bad)
    with pytest.raises(ValueError, match="checkpoint has 3 tensors, model expects 4"):
        load_in_order(model, dict(list(good.items())[:3]))


def test_backbone_contract_list_models_and_arch_names() -> None:
    from torch import nn

    from fcn_core.models import Backbone, build_backbone, list_models
    from fcn_core.models.backbones import BACKBONE_CLASSES

    assert "fcn8s/efficientnet_lite0" in list_models() and "fcn32s/vgg16" in list_models()
    for name in BACKBONE_CLASSES:
        assert isinstance(build_backbone(name), Backbone), name
    for arch in ("fcn32s", "fcn16s", "fcn8s"):
        assert build_model(arch, 3, "efficientnet_lite0").arch == arch

    class NoContract(nn.Module):  # forward exists, channels/geometry/normalization do not
        def __init__(self, pretrained: bool = False) -> None:
            super().__init__()

    BACKBONE_CLASSES["no_contract"] = NoContract
    try:
        with pytest.raises(TypeError, match="Backbone contract"):
            build_backbone("no_contract")
    finally:
        del BACKBONE_CLASSES["no_contract"]
