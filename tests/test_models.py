"""Issue 2: hierarchical-branch models, fusion split, export, bad input."""
import pytest
import torch
import torchvision

from ahbf.methods import build_graph
from ahbf.models import ARCHS, create_model, create_plain, export_target, target_state_dict
from tests.utils import sgd_losses

CIFAR = [a for a, s in ARCHS.items() if not s.imagenet]
IMAGENET = [a for a, s in ARCHS.items() if s.imagenet]


def _input(arch, batch=2):
    size = 64 if ARCHS[arch].imagenet else 16
    return torch.randn(batch, 3, size, size)


SHAPE_CASES = [("resnet8", m, M) for m, M in [("ahbf", 4), ("ahbf", 2), ("one", 3), ("dml", 3), ("baseline", 1)]]
SHAPE_CASES += [("resnet32", "ahbf", 3), ("resnet110", "ahbf", 3), ("resnet110", "one", 2),
                ("resnet18", "ahbf", 4), ("resnet50", "baseline", 1)]


@pytest.mark.parametrize("arch,method,M", SHAPE_CASES)
def test_output_shapes(arch, method, M):
    model = create_model(arch, method, num_classes=7, num_branches=M)
    out = model(_input(arch, 3))
    assert len(out.logits) == M and all(z.shape == (3, 7) for z in out.logits)
    widths = build_graph(method, M).score_widths
    assert [tuple(s.shape) for s in out.scores] == [(3, w) for w in widths]
    if method == "ahbf":  # scores are post-ReLU, pre-softmax
        assert all((s >= 0).all() for s in out.scores)


def _blocks(branch):
    return [len(getattr(branch, n)) for n in branch.stage_names]


@pytest.mark.parametrize("arch,aux,expected", [
    ("resnet32", 4, [[5], [9], [13], [17]]),             # layer3: 5 + i*aux
    ("resnet110", 2, [[12], [14], [16], [18]]),
    ("resnet18", 2, [[2, 2], [4, 2], [4, 4], [6, 4]]),   # layer3 += aux*ceil(i/2), layer4 += aux*floor(i/2)
    ("resnet50", 1, [[6, 3], [7, 3], [7, 4], [8, 4]]),
])
def test_branch_depths_follow_spec(arch, aux, expected):
    model = create_model(arch, "ahbf", num_classes=10, num_branches=4, aux=aux)
    assert [_blocks(b) for b in model.branches] == expected
    assert len(model.fusions) == 3


def test_default_aux():
    assert create_model("resnet32", "ahbf", 10).spec["aux"] == 4
    assert create_model("resnet18", "ahbf", 10).spec["aux"] == 2
    assert create_model("resnet32", "one", 10).spec["aux"] == 0


def test_branch_widths_and_trunk():
    m = create_model("resnet110", "ahbf", 10, num_branches=2)
    assert m.branches[0].out_channels == 256 and m.trunk.out_channels == 128
    assert m.fusions[0].conv.in_channels == 512 and m.fusions[0].conv.out_channels == 256
    m = create_model("resnet32", "one", 10, num_branches=3)
    assert m.gate.fc.in_features == 32 and m.gate.fc.out_features == 3


def test_initialisation_matches_torchvision():
    m = create_model("resnet32", "ahbf", 10, num_branches=2)
    bns = [x for x in m.modules() if isinstance(x, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d))]
    assert all((b.weight == 1).all() and (b.bias == 0).all() for b in bns)
    conv = m.trunk.conv1.weight  # kaiming normal, fan_out: std = sqrt(2 / (out * k * k))
    assert abs(conv.std().item() - (2 / (16 * 9)) ** 0.5) < 0.03


@pytest.mark.parametrize("arch", IMAGENET)
def test_export_into_torchvision_is_exact(arch):
    model = create_model(arch, "ahbf", num_classes=5, num_branches=2)
    with torch.no_grad():  # non-trivial BN statistics, so the check covers buffers too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    plain = getattr(torchvision.models, arch)(weights=None, num_classes=5)
    plain.load_state_dict(target_state_dict(model), strict=True)
    model.eval(), plain.eval()
    x = _input(arch)
    with torch.no_grad():
        assert torch.equal(model(x).logits[0], plain(x))


@pytest.mark.parametrize("method", ["ahbf", "one", "dml", "baseline"])
def test_export_cifar_target(method):
    model = create_model("resnet8", method, num_classes=6, num_branches=3).eval()
    plain = export_target(model).eval()
    assert type(plain) is type(create_plain("resnet8", 6))
    x = _input("resnet8")
    with torch.no_grad():
        assert torch.equal(model(x).logits[0], plain(x))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = create_model("resnet8", "ahbf", num_classes=4, num_branches=3, aux=1)
    graph = build_graph("ahbf", 3)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    losses = sgd_losses(model, x, y, graph, 0.05)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet32", method="ahbf", num_branches=1), "num_branches"),
    (dict(arch="resnet32", method="one", num_branches=0), "num_branches"),
    (dict(arch="resnet32", method="ahbf", aux=-1), "aux"),
    (dict(arch="resnet33"), "architecture"),
    (dict(arch="resnet32", method="kd"), "method"),
    (dict(arch="resnet32", num_classes=0), "num_classes"),
])
def test_bad_arguments_give_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        create_model(**kwargs)
    assert "\n" not in str(err.value)
