"""Importing the PyTorch reference's checkpoints: same logits, same masks."""
import jax.numpy as jnp
import numpy as np
import pytest

from edgepopup_jax import masking, subnet
from edgepopup_jax.interop import hidden_networks as hn
from edgepopup_jax.models import get_model

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
    """The reference's cResNet18 (resnet_cifar.py layout and names), eval mode."""

    def __init__(self):
        super().__init__()
        self.conv1 = RefSubnetConv(3, 64, 3, padding=1)
        self.bn1 = nonaffine_bn(64)
        cin = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            blocks = []
            for j in range(2):
                blocks.append(RefBasicBlock(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = RefSubnetConv(512, 10, 1)

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
