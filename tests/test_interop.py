"""Importing the PyTorch reference's checkpoints: same logits, same masks; and training from
an imported state: the same losses, masks and scores step by step (benchmarks/reference_parity.py
against this file's re-creation of the reference), planted differences caught."""
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgepopup_jax.core import masking, selection
from edgepopup_jax.models import get_model
from edgepopup_jax.subnet import io as subnet
from edgepopup_jax.subnet.interop import hidden_networks as hn

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
K = 0.3


class GetSubnet(torch.autograd.Function):
    """The reference's mask semantics: sort |S| ascending, zero the lowest int((1-k)*n)."""

    @staticmethod
    def forward(ctx, scores, k):
        out = torch.zeros_like(scores)
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        out.view(-1)[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):  # straight through, as the reference's
        return g, None


class RefSubnetConv(nn.Conv2d):
    def __init__(self, *a, **kw):
        super().__init__(*a, bias=False, **kw)
        self.scores = nn.Parameter(torch.rand(self.weight.shape) * 2 - 1)  # tie-free floats

    def mask(self):
        return GetSubnet.apply(self.scores.abs(), K)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask(), None, self.stride, self.padding)


def nonaffine_bn(c):
    bn = nn.BatchNorm2d(c, affine=False)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return bn


class RefConv4Wide(nn.Module):
    """The reference's Conv4Wide at width_mult 0.25 (as its frankle.py builds it)."""

    def __init__(self, s=lambda n: int(n * 0.25)):
        super().__init__()
        self.s = s
        self.convs = nn.Sequential(
            RefSubnetConv(3, s(64), 3, padding=1), nn.ReLU(), RefSubnetConv(s(64), s(64), 3, padding=1),
            nn.ReLU(), nn.MaxPool2d((2, 2)), RefSubnetConv(s(64), s(128), 3, padding=1), nn.ReLU(),
            RefSubnetConv(s(128), s(128), 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 2)))
        self.linear = nn.Sequential(
            RefSubnetConv(s(128) * 8 * 8, s(256), 1), nn.ReLU(), RefSubnetConv(s(256), s(256), 1),
            nn.ReLU(), RefSubnetConv(s(256), 10, 1))

    def forward(self, x):
        out = self.convs(x)
        out = out.view(out.size(0), self.s(128) * 8 * 8, 1, 1)
        return self.linear(out).squeeze()


class RefBasicBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = RefSubnetConv(cin, planes, 3, stride=stride, padding=1)
        self.bn1 = nonaffine_bn(planes)
        self.conv2 = RefSubnetConv(planes, planes, 3, padding=1)
        self.bn2 = nonaffine_bn(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(RefSubnetConv(cin, planes, 1, stride=stride), nonaffine_bn(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class RefCResNet18(nn.Module):
    """The reference's cResNet18 (resnet_cifar.py layout and names), channels scaled by width."""

    def __init__(self, width=1.0):
        super().__init__()
        s = lambda n: int(n * width)  # noqa: E731
        self.conv1 = RefSubnetConv(3, s(64), 3, padding=1)
        self.bn1 = nonaffine_bn(s(64))
        cin = s(64)
        for i, planes in enumerate(s(p) for p in (64, 128, 256, 512)):
            blocks = []
            for j in range(2):
                blocks.append(RefBasicBlock(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = RefSubnetConv(cin, 10, 1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        out = out.mean(dim=(2, 3), keepdim=True)
        return self.fc(out).flatten(1)


def _init_weights(model, signed_constant):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, RefSubnetConv):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if signed_constant:
                fan = m.weight[0].numel()
                m.weight.data = m.weight.data.sign() * (2.0 / fan) ** 0.5


def _ref_masks(model):
    return {name: m.mask().detach().numpy() for name, m in model.named_modules() if isinstance(m, RefSubnetConv)}


def _checkpoint(model):
    """As the reference saves it: {'state_dict': DataParallel-prefixed tensors, ...}."""
    return {"epoch": 3, "arch": type(model).__name__, "best_acc1": 0.5,
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("signed_constant", [False, True])
def test_conv4wide_import_matches_reference(tmp_path, signed_constant):
    torch.manual_seed(1)
    ref = RefConv4Wide().eval()
    _init_weights(ref, signed_constant)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ref(x).numpy()
    ckpt_path = tmp_path / "model_best.pth"
    torch.save(_checkpoint(ref), ckpt_path)
    name, options, variables = hn.import_checkpoint(str(ckpt_path), "Conv4Wide", keep_fraction=K, width=0.25)
    assert name == "conv4" and options["width"] == 0.25 and options["mask"] == "edge_popup"
    assert options["weight_init"] == ("signed_constant" if signed_constant else "kaiming_normal")
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    assert get_model(name, **options).width == 0.25
    # masks: the same kept weights as the reference, layer by layer
    ref_masks = _ref_masks(ref)
    ours = {"convs.0": "conv0", "convs.2": "conv1", "convs.5": "conv2", "convs.7": "conv3",
            "linear.0": "fc0", "linear.2": "fc1", "linear.4": "head"}
    masks = subnet.layer_masks({o: variables["params"][o]["scores"] for o in ours.values()},
                               mask_mode="edge_popup", keep_fraction=K)
    for rname, oname in ours.items():
        s = variables["params"][oname]["scores"]
        m = masks[oname]
        assert m.sum() == ref_masks[rname].sum() == masking.kept_count(s.size, K)
        kept_ref = np.sort(ref.get_submodule(rname).weight.detach().numpy()[ref_masks[rname] != 0])
        kept_ours = np.sort(np.asarray(variables["frozen"][oname]["kernel"])[m != 0])
        np.testing.assert_array_equal(kept_ours, kept_ref)
    # the CLI writes a subnet file that loads to the same logits (edge-popup masks computed by
    # masking.topk_mask_forward on the imported scores, then folded: W * mask)
    out = tmp_path / "c4.subnet"
    assert hn.main([f"--checkpoint={ckpt_path}", "--arch=Conv4Wide", f"--keep_fraction={K}",
                    "--width=0.25", f"--out={out}"]) == 0
    model, loaded = subnet.load_subnet(out, expect_model="conv4")
    np.testing.assert_allclose(np.asarray(model.apply(loaded, x_nhwc)), want, rtol=1e-5, atol=1e-5)


def test_cresnet18_import_matches_reference(tmp_path):
    torch.manual_seed(2)
    ref = RefCResNet18().eval()
    _init_weights(ref, signed_constant=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = ref(x).numpy()
    name, options, variables = hn.convert_state_dict(_checkpoint(ref)["state_dict"], "cResNet18", keep_fraction=K)
    assert name == "cifar_resnet18"
    path = tmp_path / "r18.subnet"
    stats = subnet.save_subnet(path, model_name=name, model_options=options, variables=variables)
    ref_masks = _ref_masks(ref)
    assert stats["kept_weights"] == sum(int(m.sum()) for m in ref_masks.values())
    assert stats["kept_per_layer"]["stage1_block0/shortcut_conv"] == int(ref_masks["layer2.0.shortcut.0"].sum())
    model, loaded = subnet.load_subnet(path)
    got = np.asarray(model.apply(loaded, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_import_errors(tmp_path):
    ref = RefConv4Wide()
    sd = _checkpoint(ref)["state_dict"]
    with pytest.raises(ValueError, match="unknown reference arch"):
        hn.convert_state_dict(sd, "Conv5", keep_fraction=K)
    with pytest.raises(ValueError, match="does not match conv4"):
        hn.convert_state_dict(sd, "Conv4", keep_fraction=K)  # width 1 expected, checkpoint is 0.25
    with pytest.raises(ValueError, match="keep_fraction"):
        hn.convert_state_dict(sd, "Conv4Wide", keep_fraction=1.5, width=0.25)
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a checkpoint")
    assert hn.main([f"--checkpoint={bad}", "--arch=Conv4", "--keep_fraction=0.3",
                    f"--out={tmp_path / 'y.subnet'}"]) == 2
    assert not (tmp_path / "y.subnet").exists()


# ----------------------------------------------------------------------------- layout, layer by layer


class RefConvNet(nn.Module):
    """The reference's frankle.py layout (FC, Conv2..8): `convs` (3x3 convs + ReLU, "M" a 2x2
    max-pool), the features flattened in (C, H, W) order, then `linear` (1x1 convs + ReLU)."""

    def __init__(self, convs, linears, in_channels=3, side=32, width=1.0):
        super().__init__()
        w = lambda n: int(n * width)  # noqa: E731 - the reference's scale()
        layers, c = [], in_channels
        for v in convs:
            if v == "M":
                layers.append(nn.MaxPool2d((2, 2)))
                side //= 2
            else:
                layers += [RefSubnetConv(c, w(v), 3, padding=1), nn.ReLU()]
                c = w(v)
        self.convs = nn.Sequential(*layers)
        self.flat = (c, side, side)
        n, lin = c * side * side, []
        for v in linears:
            lin += [RefSubnetConv(n, w(v), 1), nn.ReLU()]
            n = w(v)
        self.linear = nn.Sequential(*lin, RefSubnetConv(n, 10, 1))

    def forward(self, x):
        out = self.convs(x)
        return self.linear(out.reshape(out.size(0), -1, 1, 1)).flatten(1)


def _ours_layout(t, ndim, flat_from=None):
    """A reference (out, in, kh, kw) tensor laid out as ours, by index arithmetic: convs HWIO;
    linears (in, out), the first after the convs with its inputs in our (H, W, C) flatten order
    (flat_from = (C, H, W)) instead of the reference's (C, H, W)."""
    if ndim == 4:
        return t.transpose(2, 3, 1, 0)
    t = t[:, :, 0, 0]
    if flat_from is not None:
        c, h, w = flat_from
        i, j, k = np.unravel_index(np.arange(c * h * w), (h, w, c))  # our input = (row i, col j, channel k)
        t = t[:, (k * h + i) * w + j]  # the reference's input index of that same activation
    return t.T


def _topk(scores, k):
    """The top kept_count(n, k) of |scores| as a 0/1 array (a stable numpy sort; scores are tie-free)."""
    flat = np.abs(scores).reshape(-1)
    mask = np.zeros(flat.size, np.float32)
    mask[np.argsort(-flat, kind="stable")[:masking.kept_count(flat.size, k)]] = 1
    return mask.reshape(scores.shape)


def _assert_same_layers(ref, variables, ours_of, flat_from=None) -> dict:
    """Every masked layer: scores, weights and the mask equal the reference's position by position.
    ours_of: reference module name -> our layer path; flat_from: (name, (C, H, W)) of the first
    linear after the convs. Returns our masked kernels W * mask as a `masks` collection."""
    ref_masks = _ref_masks(ref)
    assert set(ours_of) == set(ref_masks)
    folded = {}
    for rname, path in ours_of.items():
        module = ref.get_submodule(rname)
        scores, kernel = variables["params"], variables["frozen"]
        for p in path:
            scores, kernel = scores[p], kernel[p]
        scores, kernel = np.asarray(scores["scores"]), np.asarray(kernel["kernel"])
        perm = flat_from[1] if flat_from and flat_from[0] == rname else None
        as_ours = lambda t: _ours_layout(t, kernel.ndim, perm)  # noqa: E731
        np.testing.assert_array_equal(kernel, as_ours(module.weight.detach().numpy()), err_msg=rname)
        np.testing.assert_array_equal(scores, as_ours(module.scores.detach().numpy()), err_msg=rname)
        ours_mask = _topk(scores, K)
        np.testing.assert_array_equal(ours_mask, as_ours(ref_masks[rname]), err_msg=rname)
        node = folded
        for p in path:
            node = node.setdefault(p, {})
        node["kernel"] = jnp.asarray(kernel * ours_mask)
    return folded


CONVNETS = {  # reference arch: (convs, hidden linears, width used here, input channels and side)
    "FC": ((), (300, 100), 1.0, (1, 28)),
    "Conv2": ((64, 64, "M"), (256, 256), 0.25, (3, 32)),
    "Conv6": ((64, 64, "M", 128, 128, "M", 256, 256, "M"), (256, 256), 0.25, (3, 32)),
    "Conv8": ((64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"), (256, 256), 0.25, (3, 32)),
}


@pytest.mark.parametrize("arch", list(CONVNETS))
def test_convnet_import_maps_every_position(arch):
    """FC, Conv2, Conv6 and Conv8 (small widths): every layer's weights, scores and mask land
    where the reference has them, the first linear's inputs reordered from (C, H, W); same logits."""
    convs, linears, width, (cin, side) = CONVNETS[arch]
    torch.manual_seed(3)
    ref = RefConvNet(convs, linears, cin, side, width).eval()
    _init_weights(ref, signed_constant=False)
    x = torch.randn(3, cin, side, side)
    with torch.no_grad():
        want = ref(x).numpy()
    name, options, variables = hn.convert_state_dict(_checkpoint(ref)["state_dict"], arch,
                                                     keep_fraction=K, width=width)
    assert name == arch.lower() and options.get("width", 1.0) == width
    conv_names = [n for n, m in ref.convs.named_children() if isinstance(m, RefSubnetConv)]
    lin_names = [n for n, m in ref.linear.named_children() if isinstance(m, RefSubnetConv)]
    ours_of = {f"convs.{n}": (f"conv{i}",) for i, n in enumerate(conv_names)}
    ours_of.update({f"linear.{n}": (f"fc{i}",) for i, n in enumerate(lin_names[:-1])})
    ours_of[f"linear.{lin_names[-1]}"] = ("head",)
    folded = _assert_same_layers(ref, variables, ours_of,
                                 (f"linear.{lin_names[0]}", ref.flat) if convs else None)
    # the logits of those layers, each with its kernel W * mask (as the trainer's eval folds them)
    got = jax.jit(get_model(name, **options).apply)({**variables, selection.MASKS: folded},
                                                     jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


class RefBottleneck(nn.Module):
    """The reference's Bottleneck (resnet.py; resnet_cifar.py's is the same at base_width 64):
    1x1, 3x3 (the stride), 1x1 to 4 * planes, its projection named `downsample` (ImageNet) or
    `shortcut` (CIFAR)."""

    def __init__(self, cin, planes, stride, base_width, shortcut_name):
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1, self.bn1 = RefSubnetConv(cin, width, 1), nonaffine_bn(width)
        self.conv2, self.bn2 = RefSubnetConv(width, width, 3, stride=stride, padding=1), nonaffine_bn(width)
        self.conv3, self.bn3 = RefSubnetConv(width, 4 * planes, 1), nonaffine_bn(4 * planes)
        self.shortcut_name = shortcut_name
        if stride != 1 or cin != 4 * planes:
            setattr(self, shortcut_name, nn.Sequential(RefSubnetConv(cin, 4 * planes, 1, stride=stride),
                                                       nonaffine_bn(4 * planes)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        proj = getattr(self, self.shortcut_name, None)
        return F.relu(out + (proj(x) if proj is not None else x))


class RefBottleneckResNet(nn.Module):
    """The reference's ResNet-50 family, stages of `depths` blocks, channels scaled by `width`
    (the reference's are depths (3, 4, 6, 3) or (3, 4, 23, 3) and width 1; its base_width 128
    makes WideResNet50_2). cifar: resnet_cifar.py's 3x3 stem without max-pool."""

    def __init__(self, depths, width, base_width=64, cifar=False):
        super().__init__()
        s = lambda n: int(n * width)  # noqa: E731
        self.cifar = cifar
        self.conv1 = (RefSubnetConv(3, s(64), 3, padding=1) if cifar
                      else RefSubnetConv(3, s(64), 7, stride=2, padding=3))
        self.bn1 = nonaffine_bn(s(64))
        cin = s(64)
        for i, n in enumerate(depths):
            blocks = []
            for j in range(n):
                blocks.append(RefBottleneck(cin, s(64 * 2**i), 2 if i > 0 and j == 0 else 1, base_width,
                                            "shortcut" if cifar else "downsample"))
                cin = 4 * s(64 * 2**i)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.depths = depths
        self.fc = RefSubnetConv(cin, 10, 1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar:
            out = F.max_pool2d(out, 3, stride=2, padding=1)
        for i in range(len(self.depths)):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.fc(out.mean(dim=(2, 3), keepdim=True)).flatten(1)


def _our_resnet_path(rname):
    """Reference ResNet module name (conv or BN) -> our layer path, spelled out for the test."""
    stem = {"conv1": ("stem_conv",), "bn1": ("stem_bn",), "fc": ("head",)}
    if rname in stem:
        return stem[rname]
    layer, block, rest = rname.split(".", 2)
    ours = {"conv1": "conv0", "conv2": "conv1", "conv3": "conv2", "bn1": "bn0", "bn2": "bn1",
            "bn3": "bn2", "downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn",
            "shortcut.0": "shortcut_conv", "shortcut.1": "shortcut_bn"}[rest]
    return (f"stage{int(layer[len('layer'):]) - 1}_block{block}", ours)


@pytest.mark.parametrize("arch, base_width, cifar", [("WideResNet50_2", 128, False), ("cResNet50", 64, True)])
def test_bottleneck_resnet_import_maps_every_position(monkeypatch, arch, base_width, cifar):
    """The bottleneck ResNets at reduced depth and width (the same mapping code as full size),
    ImageNet's (downsample, 7x7 stem; base width 128 here, ResNet-50's is 64) and CIFAR's
    (shortcut, 3x3 stem): every conv, BN statistic and mask lands where the reference has it;
    same logits."""
    depths, width = (1, 2, 1, 1), 0.125
    name, fixed = hn.ARCHS[arch]
    monkeypatch.setitem(hn.ARCHS, arch, (name, {**fixed, "stage_sizes": depths, "width": width}))
    torch.manual_seed(4)
    ref = RefBottleneckResNet(depths, width, base_width, cifar).eval()
    _init_weights(ref, signed_constant=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x).numpy()
    name, options, variables = hn.convert_state_dict(_checkpoint(ref)["state_dict"], arch, keep_fraction=K)
    assert options.get("cifar_stem", False) == cifar
    ours_of = {n: _our_resnet_path(n) for n, m in ref.named_modules() if isinstance(m, RefSubnetConv)}
    assert len(ours_of) == 3 * sum(depths) + 4 + 2  # 3 per block, 4 projections, stem and fc
    folded = _assert_same_layers(ref, variables, ours_of)
    bns = [n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(ours_of) - 1  # one after every conv but fc
    for n in bns:
        stats = variables["batch_stats"]
        for p in _our_resnet_path(n):
            stats = stats[p]
        bn = ref.get_submodule(n)
        np.testing.assert_array_equal(stats["mean"], bn.running_mean.numpy(), err_msg=n)
        np.testing.assert_array_equal(stats["var"], bn.running_var.numpy(), err_msg=n)
    got = jax.jit(get_model(name, **options).apply)({**variables, selection.MASKS: folded},
                                                     jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training, step by step


def _load_parity():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_parity.py"
    spec = importlib.util.spec_from_file_location("reference_parity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rp = _load_parity()
STEPS, STEPS_PER_EPOCH = 30, 3  # 10 epochs: the per-epoch cosine reaches 0 at the end


def _cosine_lr(optimizer, lr, epochs):
    """The reference's utils/schedulers.py cosine_lr (no warm-up), re-created: the lr of an
    epoch, set at its start."""
    def policy(epoch):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * (1 + np.cos(np.pi * epoch / epochs)) * lr
    return policy


@pytest.fixture
def one_torch_thread():
    """torch's intra-op threads spin against JAX's (and other processes') on a small CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(monkeypatch, arch, plant=None):
    """Conv4 (width 0.25, signed constant) or cResNet18 (width 0.125, kaiming normal, BN in
    train mode) from this file's re-creation, trained STEPS steps with the reference's recipe
    (SGD lr 0.1, momentum 0.9, decay on the scores: 1e-4, ResNet 5e-4) and ours from its
    initial state, in lockstep."""
    torch.manual_seed(5)
    if arch == "Conv4":
        model = RefConvNet((64, 64, "M", 128, 128, "M"), (256, 256), width=0.25)
        ref_arch, width, decay, side = "Conv4Wide", 0.25, 1e-4, 32
    else:
        model = RefCResNet18(width=0.125)
        for m in model.modules():  # the reference's BN starts at mean 0, var 1
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        name, fixed = hn.ARCHS["cResNet18"]
        monkeypatch.setitem(hn.ARCHS, "cResNet18", (name, {**fixed, "width": 0.125}))
        ref_arch, width, decay, side = "cResNet18", 1.0, 5e-4, 16
    _init_weights(model, signed_constant=arch == "Conv4")
    scores = []
    for m in model.modules():
        if isinstance(m, RefSubnetConv):
            m.weight.requires_grad_(False)  # frozen, as the reference's --freeze-weights
            scores.append(m.scores)
    opt = torch.optim.SGD(scores, lr=0.1, momentum=0.9, weight_decay=decay)
    epochs = STEPS // STEPS_PER_EPOCH
    ref = rp.TorchSide(model, opt, _cosine_lr(opt, 0.1, epochs), nn.CrossEntropyLoss(),
                       lambda m: m.mask(), ref_arch, K, width)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=decay, nesterov=False, warmup=0, label_smoothing=0.0)
    data = rp.batches(rp.Case(arch, "", K, 8, side), STEPS_PER_EPOCH, 10, 0, None)
    make_ours = lambda state: rp.JaxSide(  # noqa: E731
        state, arch=ref_arch, keep_fraction=K, width=width, hyper=hyper, steps=STEPS,
        steps_per_epoch=STEPS_PER_EPOCH, num_classes=10, plant=plant)
    return rp.run(ref, make_ours, data, STEPS, STEPS_PER_EPOCH, log=lambda *a: None,
                  stop_at_parting=plant is not None)


@pytest.mark.parametrize("arch", ["Conv4", "cResNet18"])
def test_training_matches_reference_step_by_step(monkeypatch, one_torch_thread, arch):
    res = _train(monkeypatch, arch)
    assert res.agrees, res.parted
    assert len(res.records) == STEPS
    assert res.records[0]["loss_rel"] < 1e-5
    assert all(v["mask_agree"] == 1.0 for v in res.records[0]["layers"].values())


PARTING = {  # plant: the step and our layer where the runs part ({first}: the model's first layer)
    "no_score_decay": (0, "{decayed}: score update"),  # where decay weighs most against the gradient
    "signed_scores": (0, "{first}: mask"),
    "lr_per_step": (2, "{first}: score update"),  # lr 1.1% lower at step 2 (step 0: equal)
    "bn_eval": (0, "stem_bn: BN running stats"),
    "count_rounding": (0, "{first}: mask"),  # conv0: 432 weights, k * n = 129.6, 130 kept vs 129
}


@pytest.mark.parametrize("arch, plant", [("Conv4", p) for p in rp.PLANTS if p != "bn_eval"]
                         + [("cResNet18", p) for p in rp.PLANTS])
def test_planted_difference_is_caught(monkeypatch, one_torch_thread, arch, plant):
    """Each planted difference in our step makes the check fail, naming the step and layer."""
    res = _train(monkeypatch, arch, plant)
    assert not res.agrees
    step, where = PARTING[plant]
    assert res.parted[0] == step, res.parted
    first, decayed = ("conv0", "conv0") if arch == "Conv4" else ("stem_conv", "stage0_block0/conv1")
    assert res.parted[1].startswith(where.format(first=first, decayed=decayed)), res.parted
