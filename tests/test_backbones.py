"""torchvision:<name> / timm:<name> models with hierarchical branches (ahbf.models.backbones, docs/models.md)."""
import csv
import math
import sys

import pytest
import timm
import torch
import torchvision

from ahbf.engine.checkpoint import ModelMismatchError, check_spec, load_checkpoint
from ahbf.engine.cli import export_main, train_main
from ahbf.engine.config import ConfigError, build_config
from ahbf.engine.distributed import convert_sync_batchnorm
from ahbf.engine.eval_export import model_from_checkpoint
from ahbf.engine.resolve import resolve_model
from ahbf.models import create_model, export_target, target_state_dict
from ahbf.models.backbones import build_library, extra_blocks, plan, units_and_stages
from ahbf.models.mobilenet import tail_blocks
from ahbf.models.resnet import branch_stage_blocks
from ahbf.models.summary import count_parameters

K, B, PX = 5, 4, 32


def settle_batchnorm(model, x, steps=2):
    """A few train-mode forwards so BatchNorm running statistics are not the (0, 1) they start at."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "timm:convnext_atto"])
@pytest.mark.parametrize("method,scores", [("ahbf", [(B, 2), (B, 2)]), ("one", [(B, 3)]), ("dml", [])])
def test_branch_output_contract(arch, method, scores):
    torch.manual_seed(0)
    model = create_model(arch, method, K, num_branches=3, aux=1 if method == "ahbf" else 0)
    out = model.train()(torch.randn(B, 3, PX, PX))
    assert [tuple(z.shape) for z in out.logits] == [(B, K)] * 3
    assert [tuple(s.shape) for s in out.scores] == scores
    (sum(z.logsumexp(1).sum() for z in out.logits) + sum(s.sum() for s in out.scores)).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient (DDP would need find_unused_parameters): {unused[:5]}"
    assert model.spec["split"] == {"torchvision:resnet18": "layer3", "timm:convnext_atto": "stages.3"}[arch]
    if method != "dml":  # the branches are independent draws of the library's initialisation, not copies
        w = [b.net.state_dict() for b in model.branches]
        key = next(k for k in w[0] if k.endswith("weight") and w[0][k].dim() == 4)
        assert not torch.equal(w[0][key], w[1][key])


def test_channels_last_and_autocast_forward():
    model = create_model("timm:convnext_atto", "ahbf", K, num_branches=2, aux=1).to(memory_format=torch.channels_last)
    x = torch.randn(B, 3, PX, PX).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
    assert [tuple(z.shape) for z in out.logits] == [(B, K)] * 2 and all(torch.isfinite(z).all() for z in out.logits)


@pytest.mark.parametrize("i", range(7))
def test_hierarchy_rule_is_the_papers(i):
    """Level l adds aux blocks to stage (l - 1) mod S: SPEC 2's ImageNet ResNets (S = 2), CIFAR (S = 1) and
    the MobileNetV2 family's "lower stage first" (S = 3)."""
    assert list(extra_blocks(i, 3, ["layer3", "layer4"]).values()) == [
        b - n for b, n in zip(branch_stage_blocks([2, 2, 2, 2], True, i, 3), (2, 2))]
    assert list(extra_blocks(i, 3, ["layer3"]).values()) == [branch_stage_blocks([5, 5, 5], False, i, 3)[0] - 5]
    assert list(extra_blocks(i, 3, ["a", "b", "c"]).values()) == [b - n for b, n in zip(tail_blocks(i, 3), (3, 3, 1))]
    assert extra_blocks(i, 3, []) == {}


def test_torchvision_resnet_at_layer3_has_the_registry_resnets_shape():
    """With the default split and aux, torchvision:resnet18 AHBF is the paper's ImageNet model."""
    assert count_parameters("torchvision:resnet18", "ahbf", 1000) == count_parameters("resnet18", "ahbf", 1000)
    with torch.device("meta"):
        model = create_model("torchvision:resnet18", "ahbf", 10, num_branches=4)
    assert model.spec["aux"] == 2
    for i, branch in enumerate(model.branches):
        assert [len(branch.net.layer3), len(branch.net.layer4)] == [2 + 2 * math.ceil(i / 2), 2 + 2 * (i // 2)]
        assert isinstance(branch.net.layer2, torch.nn.Identity) and isinstance(model.trunk.net.layer3, torch.nn.Identity)


@pytest.mark.parametrize("arch,split,plain", [
    ("torchvision:resnet50", None, lambda k: torchvision.models.resnet50(num_classes=k)),
    ("torchvision:resnet18", "layer2", lambda k: torchvision.models.resnet18(num_classes=k)),
    ("torchvision:mobilenet_v3_small", None, lambda k: torchvision.models.mobilenet_v3_small(num_classes=k)),
    ("timm:convnext_atto", None, lambda k: timm.create_model("convnext_atto", num_classes=k)),
    ("timm:efficientnet_b0", None, lambda k: timm.create_model("efficientnet_b0", num_classes=k)),
])
def test_export_loads_strictly_into_the_unmodified_library_model(arch, split, plain):
    torch.manual_seed(0)
    aux = 1 if plan(arch).repeatable else 0  # branch 1 deeper than the target where the family allows it
    model = create_model(arch, "ahbf", K, num_branches=2, aux=aux, split=split).double()
    x = torch.randn(B, 3, PX, PX, dtype=torch.float64)
    settle_batchnorm(model, x)
    library = plain(K).double().eval()
    library.load_state_dict(target_state_dict(model), strict=True)
    with torch.no_grad():
        assert torch.equal(library(x), model(x).logits[0])
    model, x = model.float(), x.float()  # export_target builds the plain model in float32
    with torch.no_grad():
        assert torch.equal(export_target(model).eval()(x), model(x).logits[0])


def test_split_points_and_errors_are_one_line():
    with pytest.raises(ValueError, match=r"unknown split point 'layer9'; valid split points: layer1, layer2, "
                                         r"layer3, layer4$"):
        create_model("torchvision:resnet18", "ahbf", K, split="layer9")
    with pytest.raises(ConfigError, match="valid split points: stages.0, stages.1, stages.2, stages.3"):
        build_config(overrides=[("model.arch", "timm:convnext_atto"), ("model.split", "stage3")])
    with pytest.raises(ConfigError, match="model.split applies to torchvision:<name> / timm:<name> models"):
        build_config(overrides=[("model.arch", "resnet8"), ("model.split", "layer3")])
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet1'; did you mean resnet18"):
        build_config(overrides=[("model.arch", "torchvision:resnet1")])
    with pytest.raises(ValueError, match="unknown timm model 'convnext_att'; did you mean convnext_atto"):
        create_model("timm:convnext_att", "ahbf", K)
    with pytest.raises(ConfigError, match="torchvision:<name>, timm:<name>"):
        build_config(overrides=[("model.arch", "resnet_18")])
    with pytest.raises(ValueError, match="not supported: its forward uses tensors outside its stages"):
        create_model("timm:vit_tiny_patch16_224", "ahbf", K)
    with pytest.raises(ValueError, match=r"torchvision:densenet121 \(DenseNet\) is not supported"):
        create_model("torchvision:densenet121", "ahbf", K)
    with pytest.raises(ValueError, match="aux must be 0 for timm:regnety_002 split at s4"):
        create_model("timm:regnety_002", "ahbf", K, aux=1)  # its stages after the split have no repeatable block
    assert resolve_model(build_config(overrides=[("model.arch", "timm:regnety_002")]).model).aux == 0


@pytest.mark.parametrize("arch,split,deeper", [("torchvision:mobilenet_v2", "features.14", ("features.15", "features.16")),
                                               ("torchvision:mobilenet_v3_small", "features.9", ("features.10", "features.11"))])
def test_torchvision_mobilenets_get_branches_of_increasing_depth(arch, split, deeper):
    """SPEC 2's core rule: their stages after the split are single inverted-residual blocks, which a deeper
    branch repeats (as timm's mobilenetv3, whose stages are sequences); aux = auto is 2, as for the ResNets."""
    cfg = build_config(overrides=[("model.arch", arch)])
    assert resolve_model(cfg.model).aux == 2 and resolve_model(cfg.model).split == split
    torch.manual_seed(0)
    model = create_model(arch, "ahbf", K, num_branches=3)
    blocks = [[len(b.net.get_submodule(s)) if isinstance(b.net.get_submodule(s), torch.nn.Sequential) else 1
               for s in deeper] for b in model.branches]
    assert blocks == [[1, 1], [3, 1], [3, 3]]  # level l adds aux = 2 blocks to stage (l - 1) mod 2
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in b.modules()) for b in model.branches]
    assert convs[0] < convs[1] < convs[2]
    out = model.train()(torch.randn(B, 3, PX, PX))
    assert [tuple(z.shape) for z in out.logits] == [(B, K)] * 3 and len(out.scores) == 2
    library = build_library(arch, K)  # branch 0 is still the plain model: export loads strictly
    library.load_state_dict(target_state_dict(model), strict=True)


def test_bad_input_from_the_command_line_is_one_line(capsys):
    assert train_main(["--arch", "torchvision:resnet18", "model.split=layer9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid split points: layer1, layer2, layer3, layer4" in err, err
    with pytest.raises(ValueError, match="no recognizable stages"):  # a model without stages
        units_and_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()), "torchvision:toy")


def test_a_checkpoint_of_another_split_is_refused():
    spec = dict(arch="timm:convnext_atto", method="ahbf", num_classes=K, num_branches=2, aux=1, split="stages.3")
    check_spec(spec, dict(spec), "last.pt")
    with pytest.raises(ModelMismatchError, match="split at stages.3 .* but this run builds .* split at stages.2"):
        check_spec(spec, {**spec, "split": "stages.2"}, "last.pt")


def test_sync_bn_leaves_timm_batchnorm_with_activation_intact():
    """torch's conversion would turn timm's BatchNormAct2d (BN + activation) into a bare SyncBatchNorm."""
    net = build_library("timm:mobilenetv3_small_050", K)
    count = sum(isinstance(m, timm.layers.BatchNormAct2d) for m in net.modules())
    convert_sync_batchnorm(net)
    assert count > 0 and sum(isinstance(m, timm.layers.BatchNormAct2d) for m in net.modules()) == count


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match=r"pip install ahbf\[timm\]"):
        build_library("timm:resnet18", K)


def test_train_then_export_from_the_command_line(tmp_path, capsys):
    """ahbf-train --arch torchvision:resnet18 --dataset synthetic --epochs 1, then ahbf-export."""
    out = tmp_path / "run"
    argv = ["--arch", "torchvision:resnet18", "--dataset", "synthetic", "--epochs", "1", "--num-branches", "2",
            "--aux", "1", "-b", "4", "--precision", "fp32", "--threads", "1", "--no-progress", "-o", str(out),
            "data.synthetic_samples=16", "data.synthetic_classes=3", "data.val_fraction=0", "train.tensorboard=false"]
    assert train_main(argv) == 0, capsys.readouterr().err
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["spec"] == dict(arch="torchvision:resnet18", method="ahbf", num_classes=3, num_branches=2, aux=1,
                                split="layer3")
    assert export_main([str(out / "last.pt")]) == 0, capsys.readouterr().err
    exported = out / "torchvision-resnet18_target.pt"
    assert "torchvision.models.resnet18(num_classes=3)" in capsys.readouterr().out
    plain = torchvision.models.resnet18(num_classes=3).eval()
    plain.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    model = model_from_checkpoint(ckpt)  # the spec (arch, split) rebuilds the trained model
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x).logits[0])


@pytest.mark.parametrize("precision, threads", [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)])
def test_readme_library_backbone_command_trains_sanely(tmp_path, capsys, precision, threads):
    """README's tour command (torchvision:resnet18 on synthetic 32 px images), at a tiny size. At 16 px it diverged in
    its first epoch (val loss ~1e5-1e6 in fp32, a non-finite exit in bf16): torchvision ResNets now start every
    residual block as the identity (``zero_init_residual``), and bf16 on a CPU refuses 16 px (the next test)."""
    old = torch.get_num_threads()
    try:
        code = train_main(["--arch", "torchvision:resnet18", "--dataset", "synthetic", "--epochs", "1",
                           "--image-size", "32", "data.synthetic_samples=256", "--num-branches", "2", "--precision", precision,
                           "--threads", str(threads), "--no-progress", "train.tensorboard=false", "-o", str(tmp_path)])
    finally:
        torch.set_num_threads(old)
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    val_loss = float(last["val_branch0_loss"])
    assert math.isfinite(val_loss) and val_loss < 2 * math.log(10), last  # chance level is ln 10 = 2.3


def test_bf16_on_cpu_refuses_strided_convolutions_on_1x1_maps(capsys, tmp_path):
    """oneDNN's bf16 weight gradient of a stride-2 3x3 convolution on 1 x 1 inputs is garbage on an AVX512-BF16 CPU
    (measured: relative error up to 1e37 against float64; fp32 exact): resnet18 at 16 px has such a layer
    (layer4.0.conv1), so bf16 on a CPU refuses it in one line, and nothing is left in the run folder."""
    out = tmp_path / "run"
    assert train_main(["--arch", "torchvision:resnet18", "--dataset", "synthetic", "--precision", "bf16", "--device",
                       "cpu", "--epochs", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "torchvision:resnet18 at 16 px: branches.0.net.layer4.0.conv1 and 3 more" in err and "--precision fp32" in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())
