"""Issue 12: run folders, dataset recipes, plain logs for clusters, the start-up summary, a resolved
config.yaml, ``ahbf-eval --json`` and the curves plot."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ahbf.engine.cli import eval_main, train_main, train_parser
from ahbf.engine.config import RunConfig, build_config, load_yaml
from ahbf.engine.distributed import DistEnv
from ahbf.engine.runlog import EpochProgress, use_bars
from ahbf.engine.plots import plot_curves, zoomed_limits
from ahbf.engine.recipes import NAMES, chosen_recipe
from ahbf.engine.rundir import link_latest, resolve_output
from ahbf.engine.resolve import method_defaults
from ahbf.pipelines import DataConfig, build_data

REPO = Path(__file__).resolve().parents[1]
# 58 train / 6 val / 16 test images of 8 x 8 px, resnet8, one epoch of 4 steps: about a second
TINY = ["--dataset", "synthetic", "data.synthetic_samples=64", "--image-size", "8", "--arch", "resnet8", "-b", "16",
        "data.eval_batch_size=32", "--epochs", "1", "--precision", "fp32", "--objective-backend", "eager",
        "train.tensorboard=false", "--log-interval", "2"]
CONTROL = re.compile(r"[\r\x1b]")  # carriage returns and escape sequences: progress-bar frames


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Two runs in a row with no -o, from a fresh working folder: (cwd, first folder, second folder, first mtimes)."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert train_main([*TINY, "--no-progress"]) == 0
        (first,) = [p for p in (cwd / "runs").iterdir() if p.name != "latest"]
        mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
        assert train_main([*TINY, "--no-progress"]) == 0
    finally:
        os.chdir(old)
    (second,) = [p for p in (cwd / "runs").iterdir() if p.name not in ("latest", first.name)]
    return cwd, first, second, mtimes


# ------------------------------------------------------------------------------------------- run folders
def test_two_runs_without_output_leave_two_complete_folders(runs_dir):
    cwd, first, second, mtimes = runs_dir
    outputs = {"last.pt", "best.pt", "config.yaml", "metrics.csv", "curves.png", "results.json"}
    for folder in (first, second):
        assert outputs <= {p.name for p in folder.iterdir()}, folder
        assert re.fullmatch(r"synthetic-resnet8-ahbf-\d{8}-\d{6}(-\d+)?", folder.name), folder.name
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes  # the first run is intact
    assert os.readlink(cwd / "runs" / "latest") == second.name
    assert load_yaml(str(second / "config.yaml"))["train"]["output"] == f"runs/{second.name}"


def test_resolve_output_names_and_suffixes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(overrides=[("model.method", "dml")])
    now = 1_800_000_000.0
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    assert resolve_output(cfg, {}, now) == f"runs/digits-resnet8-dml-{stamp}"
    os.makedirs(f"runs/digits-resnet8-dml-{stamp}")
    os.makedirs(f"runs/digits-resnet8-dml-{stamp}-2")
    assert resolve_output(cfg, {}, now) == f"runs/digits-resnet8-dml-{stamp}-3"
    # torchrun: every rank and every restart finds the same folder; the static default id "none" is no id
    assert resolve_output(cfg, {"TORCHELASTIC_RUN_ID": "job42"}, now) == "runs/digits-resnet8-dml-job42"
    assert resolve_output(cfg, {"TORCHELASTIC_RUN_ID": "none"}, now).startswith(f"runs/digits-resnet8-dml-{stamp}")
    cfg = cfg.replace(train={"resume": "auto"})  # a requeued job: continue the newest folder of the same dataset-arch-method
    os.utime(f"runs/digits-resnet8-dml-{stamp}", (now + 60, now + 60))
    assert resolve_output(cfg, {}, now) == f"runs/digits-resnet8-dml-{stamp}"
    assert resolve_output(build_config(overrides=[("train.resume", "auto")]), {}, now).startswith("runs/digits-resnet8-ahbf-")
    # runs started in the same second (a job array): each makes its own folder while choosing it
    cfg = cfg.replace(train={"resume": ""})
    taken = [resolve_output(cfg, {}, now, create=True) for _ in range(2)]
    assert taken == [f"runs/digits-resnet8-dml-{stamp}-3", f"runs/digits-resnet8-dml-{stamp}-4"]
    assert all(os.path.isdir(p) for p in taken)
    cfg = cfg.replace(train={"output": "/exact/path"})
    assert resolve_output(cfg, {}) == "/exact/path"
    cfg = cfg.replace(train={"name": "ablation-a"})  # wins over an output from a config file (-c <run>/config.yaml --name again)
    assert resolve_output(cfg, {"TORCHELASTIC_RUN_ID": "job42"}) == "runs/ablation-a"
    assert build_config(overrides=[("train.name", "x")]).train.output == ""  # --name does not set the output


def test_a_run_that_fails_to_start_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--dataset", "imagenet", "--data-dir", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert os.listdir(tmp_path / "runs") == []


def test_latest_link_moves_and_never_replaces_a_real_folder(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        link_latest(str(tmp_path / name))
        assert os.readlink(tmp_path / "latest") == name
    other = tmp_path / "elsewhere"
    (other / "latest").mkdir(parents=True)
    link_latest(str(other / "c"))
    assert (other / "latest").is_dir() and not (other / "latest").is_symlink()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------------------------- recipes
def comparable(cfg: RunConfig) -> dict:
    """The resolved values of a config, without where it writes."""
    data = method_defaults(cfg).to_dict()
    del data["train"]["output"], data["train"]["name"]
    return data


PAPER = {"cifar10": "configs/cifar10_resnet32_ahbf.yaml", "cifar100": "configs/cifar100_resnet32_ahbf.yaml",
         "imagenet": "configs/imagenet_resnet18_ahbf.yaml"}


def test_every_recipe_but_folder_has_a_paper_config():
    assert set(NAMES) - set(PAPER) == {"folder"}  # your own images: no paper to follow (ahbf/recipes/folder.yaml)


@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_recipe_equals_its_paper_config(dataset):
    """`--dataset X` with no -c file resolves to every value of the data set's paper config."""
    from_flag = build_config(overrides=[("data.dataset", dataset)])
    from_file = build_config([str(REPO / PAPER[dataset])])
    assert comparable(from_flag) == comparable(from_file)


def test_cifar100_flag_has_the_paper_data_and_schedule():
    paper = build_config([str(REPO / "configs/cifar100_resnet32_ahbf.yaml")]).to_dict()
    cfg = build_config(overrides=[("data.dataset", "cifar100")]).to_dict()
    for section in ("data", "schedule", "optim"):
        assert cfg[section] == paper[section], section
    assert (cfg["train"]["epochs"], cfg["model"]["arch"], cfg["objective"]["rampup"]) == (300, "resnet32", "auto")


def test_recipe_applies_only_without_a_config_file_and_under_the_flags():
    assert build_config() == RunConfig()  # no arguments: the digits demo
    assert chosen_recipe([], [("data.dataset", "imagenet")]) == "imagenet"
    assert chosen_recipe(["x.yaml"], [("data.dataset", "imagenet")]) == ""
    assert chosen_recipe([], [("data.dataset", "digits")]) == ""
    cfg = build_config(overrides=[("data.dataset", "imagenet"), ("model.arch", "resnet34"), ("optim.lr", 0.2)])
    assert (cfg.data.image_size, cfg.model.arch, cfg.optim.lr, cfg.optim.weight_decay) == (224, "resnet34", 0.2, 1e-4)
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs, cfg.train.epochs) == ("multistep", 0.0, 90)
    file_first = build_config([str(REPO / "configs/digits_demo.yaml")], [("data.dataset", "cifar10")])
    assert (file_first.schedule.name, file_first.data.image_size) == ("cosine", 16)  # the file wins


# ----------------------------------------------------------------------------------------------- logs
def test_redirected_log_has_plain_step_lines_and_no_control_codes(tmp_path):
    """`ahbf-train ... > log.txt 2>&1`: one plain line per log interval, no bar frames, even without --no-progress."""
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "ahbf.engine.cli", *TINY, "-o", str(tmp_path / "run")],
                              stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert not CONTROL.search(text), repr(CONTROL.search(text))
    steps = [line for line in text.splitlines() if line.startswith("epoch 1/1 step ")]
    assert len(steps) == 2, text  # 4 steps, log interval 2
    pattern = (r"epoch 1/1 step 2/4 \(2\)  loss \d+\.\d{4} \(ce \d+\.\d{4} kd \d+\.\d{4}\)  lr [\d.e-]+  kd_scale [\d.]+  "
               r"\d+ img/s  data \d+%  ETA \d+:\d\d:\d\d")
    assert re.fullmatch(pattern, steps[0]), steps[0]
    assert re.search(r"epoch   1/1  loss .* img/s \(data \d+%\)  \| val loss \d+\.\d{4}  \| val top-1: branch0 ", text)
    for expected in ("run folder: " + str(tmp_path / "run"), "deployed", "world size 1", "compile off",
                     "58 train / 6 val / 16 test", "in-memory tensors"):
        assert expected in text, expected
    assert re.search(r", \d+ threads? \((OMP_NUM_THREADS|\d+ usable cores)", text)  # how many, and where from


def test_bars_only_on_a_terminal(monkeypatch):
    for out, err, progress, expected in [(True, True, True, True), (False, True, True, False),
                                         (True, False, True, False), (True, True, False, False)]:
        monkeypatch.setattr(sys.stdout, "isatty", lambda out=out: out, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda err=err: err, raising=False)
        assert use_bars(progress) is expected


def test_step_line_rates_and_eta(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 1.5, 10.0, 10.0])  # window start, a batch after 1 s of waiting, the end, report at 10 s
    monkeypatch.setattr("ahbf.engine.runlog.time.perf_counter", lambda: next(clock))
    progress = EpochProgress(1, 3, 10, 640, enabled=True, bars=False)
    for _ in progress.iterate([(0, 0)]):
        progress.advance(64)
    progress.advance(64)
    line = progress.report(12, 1, {"loss": 2.0, "ce": 1.5, "kd": 0.25}, 0.05, 0.5)
    # 128 images in 10 s; 1 s of 10 waiting for data; 18 steps left at 5 s a step
    assert line == ("epoch 2/3 step 2/10 (12)  loss 2.0000 (ce 1.5000 kd 0.2500)  lr 0.05  kd_scale 0.500  "
                    "13 img/s  data 10%  ETA 0:01:30")
    assert capsys.readouterr().out.strip() == line


def test_header_names_the_recipe_in_force(tmp_path, monkeypatch):
    from ahbf.engine import run as run_module
    from ahbf.engine import trainer as trainer_module
    from ahbf.engine.cli import parse_train_args

    seen = {}

    class Fake:
        def __init__(self, cfg, recipe=""):
            seen.update(recipe=recipe, epochs=cfg.train.epochs)

        def fit(self):
            pass

    monkeypatch.setattr(trainer_module, "Trainer", Fake)
    monkeypatch.setattr(run_module, "build_resolved", lambda cfg, env, named_folder: cfg)  # nothing built: no data
    monkeypatch.chdir(tmp_path)  # resolve() makes the auto-named run folder under runs/
    assert train_main(["--dataset", "cifar100", "--epochs", "2"]) == 0
    assert seen == {"recipe": "cifar100", "epochs": 2}
    monkeypatch.undo()
    cfg = parse_train_args([*TINY, "-o", str(tmp_path)])
    trainer = trainer_module.Trainer(run_module.build_run(cfg, DistEnv(0, 0, 1, torch.device("cpu"))), recipe="cifar100")
    try:
        header = trainer.summary()
    finally:
        trainer.close()
    assert "recipe: cifar100 (the values of ahbf/recipes/cifar100.yaml" in header
    assert f"run folder: {tmp_path}" in header and "58 train / 6 val / 16 test" in header


def test_header_counts_the_real_split_sizes_not_the_padded_shards():
    data = build_data(DataConfig(dataset="digits", image_size=8), rank=0, world_size=2)
    assert data.train.num_samples * 2 == 1294 and data.sizes == {"train": 1293, "val": 144, "test": 360}


# ------------------------------------------------------------------------------- resolved config.yaml
def test_config_yaml_is_resolved_and_typed(runs_dir):
    _, first, _, _ = runs_dir
    text = (first / "config.yaml").read_text()
    assert "auto" not in text, [line for line in text.splitlines() if "auto" in line]
    data = yaml.safe_load(text)
    assert data["objective"]["detach_teacher"] is False and data["optim"]["impl"] in ("fused", "foreach", "loop")
    assert (data["train"]["device"], data["data"]["backend"], data["data"]["check_images"]) == ("cpu", "torch", "none")
    assert data["train"]["threads"] >= 1 and data["model"]["aux"] == 4 and data["data"]["image_size"] == 8
    assert build_config([str(first / "config.yaml")]).to_dict() == data  # it loads back as the same config


def test_resolved_objective_backend_and_device():
    from ahbf.engine.resolve import device_name, objective_backend, optimizer_impl

    cfg = build_config(overrides=[("objective.backend", "auto"), ("train.precision", "bf16")])
    assert objective_backend(cfg, torch.device("cpu")) == "compiled"  # auto on CPU
    assert device_name(DistEnv(1, 1, 2, torch.device("cuda", 1))) == "cuda"  # each rank its local GPU
    assert device_name(DistEnv(0, 0, 1, torch.device("cuda", 3))) == "cuda:3"
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_impl(torch.optim.SGD(p, lr=0.1, foreach=True)) == "foreach"
    assert optimizer_impl(torch.optim.SGD(p, lr=0.1, foreach=False)) == "loop"


# ------------------------------------------------------------------------------------------ ahbf-eval
@pytest.mark.parametrize("split", ["test", "val"])
def test_eval_json_parses_and_matches_the_table(runs_dir, tmp_path, capsys, split):
    _, first, _, _ = runs_dir
    out = tmp_path / "eval.json"
    assert eval_main([str(first / "last.pt"), "--split", split, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"wrote {out}: the {split} split" in table  # a file named val.json holds what --split says
    result = json.loads(out.read_text())
    assert (result["split"], result["target"], result["samples"]) == (split, "branch0", {"test": 16, "val": 6}[split])
    assert list(result["nodes"]) == ["branch0", "branch1", "branch2", "branch3", "ta0", "ta1", "ta2"]
    for name, node in result["nodes"].items():
        row = next(line for line in table.splitlines() if line.split()[:1] == [name])
        assert (float(row.split()[-2]), float(row.split()[-1])) == (round(node["top1"], 2), round(node["top5"], 2))
        assert node["samples"] == result["samples"] and node["loss"] > 0
    if split == "test":
        saved = json.load(open(first / "results.json"))["test_last"]
        assert result["nodes"]["branch0"]["top1"] == pytest.approx(saved["branch0"]["top1"])


def test_eval_chooses_the_machine_again(runs_dir, monkeypatch):
    """config.yaml records the training machine's device and decoder; evaluation elsewhere must not need them."""
    from ahbf.engine import eval_export as ev

    _, first, _, _ = runs_dir
    seen, real = {}, ev.build_data
    monkeypatch.setattr(ev, "build_data", lambda cfg, **kw: seen.update(backend=cfg.backend) or real(cfg, **kw))
    monkeypatch.setattr(ev, "resolve_device", lambda name: seen.update(device=name) or torch.device("cpu"))
    ev.run_eval(str(first / "last.pt"))
    assert seen == {"backend": "auto", "device": "auto"}


# ------------------------------------------------------------------------------------- plot, help text
def test_accuracy_axis_is_zoomed_to_the_later_epochs():
    early_low = [10.0, 60.0, 95.0, 96.0, 97.0, 98.0, 98.5, 99.0]  # the first quarter (10, 60) is left out
    assert zoomed_limits([early_low, [v - 1 for v in early_low]]) == (93.5, 99.5)  # 94-99 with 0.5 (10%) margins
    assert zoomed_limits([[float("nan")]]) is None


def test_curves_have_loss_accuracy_and_lr_panels(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: saved.update(fig=fig) or real(fig, *a, **k))
    history = [{"epoch": e, "lr": 0.1 / e, "kd_scale": 0.1 * e, "train_loss": 2.0 / e, "train_ce": 1.5 / e,
                "train_kd": 0.5, "val_branch0_loss": 1.0 / e, "val_branch0_top1": 90.0 + e, "val_ta0_top1": 91.0 + e}
               for e in range(1, 9)]
    plot_curves(history, str(tmp_path / "curves.png"), "t")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    labels = {ax.get_ylabel() for ax in saved["fig"].axes}
    assert {"learning rate", "kd_scale (KD weight of the epoch)", "val top-1 (%), zoomed to the data"} <= labels
    acc = next(ax for ax in saved["fig"].axes if ax.get_ylabel().startswith("val top-1"))
    assert acc.get_ylim()[0] > 90


def test_help_text_errors_are_fixed():
    text = " ".join(train_parser().format_help().split())
    assert "default ]" not in text and "[train.resume, default none]" in text
    assert "a few minutes" not in text and "1-2.5 minutes on 2 free CPU cores" in text and "--name" in text


def test_resume_a_run_folder_continues_it_in_place_with_its_recorded_config(tmp_path, capsys):
    """Issue 23: ``--resume runs/X`` (or a checkpoint in it) continues X with X's config (here --method dml, which
    is not repeated), in X; the flags given are listed, and one that makes it another run is refused."""
    run = tmp_path / "dml_run"
    assert train_main([*TINY, "--method", "dml", "--no-progress", "-o", str(run)]) == 0
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"continuing {run} with its recorded config" in out and "train.epochs 1 -> 2" in out
    assert "resumed from" in out and "epoch   2/2" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dml_run"]  # no new folder
    cfg = load_yaml(str(run / "config.yaml"))
    assert cfg["model"]["method"] == "dml" and cfg["train"]["epochs"] == 2
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    # a checkpoint file of the run: the same, from that checkpoint
    assert train_main(["--resume", str(run / "last.pt"), "--epochs", "3", "--no-progress"]) == 0
    assert "epoch   3/3" in capsys.readouterr().out
    # a change that makes it another run: refused with the list (the folder's run is untouched)
    assert train_main(["--resume", str(run), "--epochs", "4", "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr 0.1 -> 0.5" in err, err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("what, message", [("missing", "no such checkpoint file or run folder"),
                                           ("empty", "not a run folder (no config.yaml")])
def test_resume_of_a_missing_or_foreign_folder_is_one_line(tmp_path, capsys, what, message):
    path = tmp_path / what
    if what == "empty":
        path.mkdir()
    assert train_main(["--resume", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_the_prediction_example_in_the_docs_runs_on_an_exported_model(runs_dir, tmp_path, capsys):
    """docs/training.md's snippet, on a run's export: the classes it prints are branch 0's of the checkpoint."""
    from ahbf.engine.cli import export_main
    from ahbf.engine.eval_export import model_from_checkpoint
    from ahbf.engine.checkpoint import load_checkpoint

    _, first, _, _ = runs_dir
    exported = tmp_path / "resnet8_target.pt"
    assert export_main([str(first / "last.pt"), "-o", str(exported)]) == 0
    doc = (REPO / "docs" / "training.md").read_text().split("## Predicting with the exported model", 1)[1]
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert "runs/latest/resnet8_target.pt" in code
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    capsys.readouterr()
    ns = {"images": images}
    exec(code.replace("runs/latest/resnet8_target.pt", str(exported)), ns)  # the docs' own code
    printed = capsys.readouterr().out.strip()
    model = model_from_checkpoint(load_checkpoint(str(first / "last.pt")))
    with torch.no_grad():
        expected = model(ns["x"]).logits[0].argmax(1)
    assert printed == str(expected)


def test_a_failed_run_does_not_repoint_latest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main([*TINY, "--no-progress", "--name", "good"]) == 0
    assert os.readlink("runs/latest") == "good"
    assert train_main([*TINY, "--no-progress", "--name", "diverged", "--lr", "1e30"]) == 3  # non-finite loss
    assert "non-finite" in capsys.readouterr().err
    assert os.readlink("runs/latest") == "good"
    assert train_main([*TINY, "--no-progress", "--name", "good2"]) == 0
    assert os.readlink("runs/latest") == "good2"


def test_eval_in_another_precision_than_training(runs_dir, capsys):
    """The images follow the precision: an fp32 run evaluated in fp64 (float64 weights and images)."""
    _, first, _, _ = runs_dir
    assert eval_main([str(first / "last.pt"), "--precision", "fp32"]) == 0
    fp32 = capsys.readouterr().out
    assert eval_main([str(first / "last.pt"), "--precision", "fp64"]) == 0
    fp64 = capsys.readouterr().out
    assert "fp64" in fp64 and fp64.split("fp64")[1].split("\n")[2] == fp32.split("fp32")[1].split("\n")[2]  # same top-1


def test_a_recorded_config_chooses_the_machine_again(monkeypatch):
    """A GPU run's config.yaml (triton objective, cuda device) continued or evaluated on a CPU box."""
    from ahbf.engine.resolve import rechoose_machine

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recorded = RunConfig().replace(train={"device": "cuda", "threads": 8}, objective={"backend": "triton"},
                                   data={"backend": "dali"})
    cfg = rechoose_machine(recorded)
    assert (cfg.train.device, cfg.train.threads, cfg.data.backend, cfg.objective.backend) == ("auto", 0, "auto", "auto")
    kept = rechoose_machine(RunConfig().replace(objective={"backend": "eager"}))
    assert kept.objective.backend == "eager"  # an explicit choice that runs here stays
