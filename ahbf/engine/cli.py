"""Command lines: ``ahbf-train``, ``ahbf-eval``, ``ahbf-export``.

Flags are shorthands for config keys (their help is the field's docstring); any key can also be set
as ``section.key=value``. Known kinds of bad input end with one line, ``<prog>: error: <message>``,
and exit status 2, like argparse's own errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Callable

from .checkpoint import CheckpointError
from .durable import WriteError
from .checks import CHOICES
from .config import SECTIONS, ConfigError, RunConfig, build_config, field_docs, parse_override
from .distributed import LocalMainFailed, lost_peer
from .fault import (NONFINITE_EXIT, PEERS_LOST_EXIT, PREEMPTED_EXIT, STORAGE_ERRNOS, WRITE_FAILED_EXIT,
                    Preempted, agent_died, end_orphan, watch_agent)
from .meters import NonFiniteLossError
from .recipes import chosen_recipe
from .rundir import discard_if_empty

# (flags, config key); booleans get --x / --no-x
TRAIN_FLAGS: list[tuple[tuple[str, ...], str]] = [
    (("--arch",), "model.arch"),
    (("--method",), "model.method"),
    (("--num-branches",), "model.num_branches"),
    (("--aux",), "model.aux"),
    (("--dataset",), "data.dataset"),
    (("--data-dir",), "data.root"),
    (("--download",), "data.download"),
    (("--image-size",), "data.image_size"),
    (("-b", "--batch-size"), "data.batch_size"),
    (("-j", "--workers"), "data.workers"),
    (("--epochs",), "train.epochs"),
    (("--lr",), "optim.lr"),
    (("--momentum",), "optim.momentum"),
    (("--wd", "--weight-decay"), "optim.weight_decay"),
    (("--clip-grad",), "optim.clip_grad"),
    (("--sched",), "schedule.name"),
    (("--milestones",), "schedule.milestones"),
    (("--warmup-epochs",), "schedule.warmup_epochs"),
    (("--temperature",), "objective.T"),
    (("--kd-weight",), "objective.kd_weight"),
    (("--rampup",), "objective.rampup"),
    (("--objective-backend",), "objective.backend"),
    (("-o", "--output"), "train.output"),
    (("--name",), "train.name"),
    (("--resume",), "train.resume"),
    (("--seed",), "train.seed"),
    (("--device",), "train.device"),
    (("--precision",), "train.precision"),
    (("--channels-last",), "train.channels_last"),
    (("--compile",), "train.compile"),
    (("--compile-mode",), "train.compile_mode"),
    (("--threads",), "train.threads"),
    (("--sync-bn",), "train.sync_bn"),
    (("--deterministic",), "train.deterministic"),
    (("--log-interval",), "train.log_interval"),
    (("--progress",), "train.progress"),
    (("--checkpoint-every",), "train.checkpoint_every"),
    (("--keep-last",), "train.keep_last"),
    (("--precise-bn",), "train.precise_bn"),
    (("--overwrite",), "train.overwrite"),
]
USER_ERRORS = (ValueError, OSError, ImportError, NonFiniteLossError)  # ConfigError, CheckpointError: ValueError


def _field(key: str) -> tuple[dataclasses.Field, str, Any]:
    section, name = key.split(".")
    cls = SECTIONS[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f, field_docs(cls).get(name, ""), getattr(getattr(RunConfig(), section), name)


def _add_config_flag(parser: argparse.ArgumentParser, flags: tuple[str, ...], key: str) -> None:
    f, doc, default = _field(key)
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f"{doc} [{key}" + (f", default {shown}]" if shown != "" else ", default none]")
    help_text = help_text.replace("%", "%%")
    kw: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=help_text)
    if key == "train.compile":  # --compile alone = model (it was a boolean flag); --no-compile = off
        parser.add_argument(*flags, nargs="?", const="model", metavar="{off,model,branches}", **kw)
        parser.add_argument("--no-compile", dest=key, action="store_const", const="off", default=argparse.SUPPRESS,
                            help="same as --compile off")
    elif f.type in ("bool", bool):
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
    elif str(f.type).startswith("tuple"):
        parser.add_argument(*flags, nargs="+", metavar="N", **kw)
    else:
        meta = "{" + ",".join(CHOICES[key]) + "}" if key in CHOICES and key != "model.arch" else key.split(".")[1].upper()
        parser.add_argument(*flags, metavar=meta, **kw)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ahbf-train", allow_abbrev=False,  # --epoch is not --epochs
        description="Train a network with online knowledge distillation (--method: AHBF or a peer method, "
                    "docs/methods.md; baseline: a plain network). With no arguments: AHBF, 4 branches, ResNet-8 on the bundled digits (1-2.5 minutes on "
                    "2 free CPU cores). --dataset cifar10 | cifar100 | imagenet without -c applies that data set's "
                    "paper recipe (configs/<dataset>_resnet32_ahbf.yaml, imagenet_resnet18_ahbf.yaml); "
                    "flags override it.",
        epilog="Any config key can be set as section.key=value (e.g. objective.lambda1=2 data.val_fraction=0); "
               "sections: " + ", ".join(SECTIONS) + ". Order: defaults < -c files < flags < key=value. "
               "Paper runs: configs/*.yaml. Multi-GPU: torchrun --nproc_per_node N -m ahbf.engine.cli -c ... "
               "Reference: docs/training.md.")
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="YAML config file (repeatable; later files override earlier ones)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    for flags, key in TRAIN_FLAGS:
        _add_config_flag(p, flags, key)
    p.add_argument("--amp", dest="train.precision", action="store_const", const="auto", default=argparse.SUPPRESS,
                   help="mixed precision: same as --precision auto (bf16 where supported, else fp16)")
    p.add_argument("--no-amp", dest="train.precision", action="store_const", const="fp32", default=argparse.SUPPRESS,
                   help="full fp32: same as --precision fp32")
    return p


def _bare_compile(argv: list[str]) -> list[str]:
    """``--compile`` takes an optional mode: followed by anything but a mode (``--compile a.b=c``) it is
    the bare flag (``--compile=model``), so it never swallows the next argument."""
    modes = CHOICES["train.compile"]
    return [("--compile=model" if a == "--compile" and (i + 1 == len(argv) or argv[i + 1] not in modes) else a)
            for i, a in enumerate(argv)]


def parse_train_args(argv: list[str] | None) -> RunConfig:
    return _parse_train_args(argv)[0]


def _parse_train_args(argv: list[str] | None) -> tuple[RunConfig, str]:
    """(the config, the name of the data-set recipe in force or "")."""
    args = train_parser().parse_intermixed_args(_bare_compile(sys.argv[1:] if argv is None else argv))
    flags = [(k, v) for k, v in vars(args).items() if "." in k]
    overrides = flags + [parse_override(o) for o in args.overrides]
    cfg = build_config(args.config, overrides)
    t = cfg.train
    if t.resume in ("", "auto") or t.output or t.name:
        return cfg, chosen_recipe(args.config, overrides)
    return _continued(t.resume, args.config, overrides), ""


def _continued(path: str, files: list[str], overrides: list[tuple[str, Any]]) -> RunConfig:
    """``--resume <run folder | checkpoint>`` without ``-o`` / ``--name``: the run's recorded config, then the
    files and flags given, continued in the run's folder; every value they change is listed (a folder then
    refuses changes that make it another run, as ``--resume auto`` does; a checkpoint file notes them)."""
    from .checkpoint import load_checkpoint
    from .config import config_from_dict, load_yaml
    from .resolve import rechoose_machine
    from .rundir import continued_run

    folder, resume, recorded_file = continued_run(path)
    recorded = load_yaml(recorded_file) if recorded_file else load_checkpoint(path).get("config") or {}
    base = rechoose_machine(config_from_dict(recorded))  # config.yaml records the first machine's choices
    cfg = build_config(files, [(k, v) for k, v in overrides if k != "train.resume"], base=base)
    cfg = cfg.replace(train={"output": folder, "name": "", "resume": resume})
    old, new = base.to_dict(), cfg.to_dict()
    changed = [f"{s}.{k} {old[s][k]!r} -> {v!r}" for s in new for k, v in new[s].items()
               if k not in ("output", "name", "resume") and old[s].get(k) != v]
    if _node_main():
        print(f"continuing {folder} with its recorded config ({recorded_file or path})"
              + (f"; changed by the command line: {', '.join(changed)}" if changed else ""))
    return cfg


def _run(prog: str, fn: Callable[[], Any]) -> int:
    """The CLI boundary: known kinds of bad input -> one line on stderr and exit status 2. Under torchrun a
    config error and a non-finite loss are printed once per node (local rank 0); other errors (a rank's own
    bad image) and a stop by each rank."""
    try:
        fn()
    except Preempted as err:  # a stop signal: the checkpoint of the last finished step is written
        _say(f"{prog}: {' '.join(str(err).split())}", every_rank=True)  # which rank had the signal
        return PREEMPTED_EXIT
    except NonFiniteLossError as err:
        _say(f"{prog}: error: {' '.join(str(err).split())}")
        return NONFINITE_EXIT
    except RuntimeError as err:  # another rank or node is gone: one line, not a traceback per rank and attempt
        if not lost_peer(err):
            raise
        if agent_died():
            end_orphan()  # the cause: this node's agent died (its workers exit, the other ranks lose them)
        text = " ".join(str(err).split())
        if not text.startswith("rank "):  # a transport error: what it says, without the source path and advice
            text = re.sub(r"^\[[^\]]*\] ", "", text).split(". This is typically")[0][:200]
            text = f"lost another rank in a collective (its process or node died): {text}"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return PEERS_LOST_EXIT
    except USER_ERRORS as err:
        _say(f"{prog}: error: {' '.join(str(err).split())}", every_rank=not isinstance(err, (ConfigError, LocalMainFailed)))
        # a failed write (disk full, quota, ulimit -f) is neither bad input nor a crash
        storage = isinstance(err, WriteError) or getattr(err, "errno", None) in STORAGE_ERRNOS
        return WRITE_FAILED_EXIT if storage else 2
    except KeyboardInterrupt as err:  # a second Ctrl-C; during a checkpoint write it names the file
        _say(f"{prog}: interrupted{' ' + str(err) if str(err) else ''}", every_rank=True)
        return 130
    return 0


def _node_main() -> bool:
    """Local rank 0 under torchrun (before the process group exists), or a single process."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _say(line: str, every_rank: bool = False) -> None:
    """A final line on stderr; under torchrun once per node (local rank 0) unless ``every_rank``: a config error
    (a missing plugin or file) may be one node's alone."""
    if every_rank or _node_main():
        print(line, file=sys.stderr)


def _train(argv: list[str] | None) -> None:
    from . import distributed
    from .resolve import resolve
    from .run import build_resolved
    from .rundir import is_named_folder
    from .trainer import Trainer

    cfg, recipe = _parse_train_args(argv)
    auto_named, named = not (cfg.train.output or cfg.train.name), is_named_folder(cfg)
    watch_agent()  # under torchrun: end with the agent, also while the set-up waits for other ranks
    env = distributed.setup(cfg.train.device, cfg.train.dist_timeout)
    try:
        cfg = resolve(cfg, env)  # names (and makes) the run folder
        Trainer(build_resolved(cfg, env, named_folder=named), recipe=recipe).fit()
    except BaseException:
        if auto_named and cfg.train.output and env.is_main:
            discard_if_empty(cfg.train.output)  # the folder chosen (and made) for a run that failed to start
        raise
    finally:
        distributed.teardown()


def train_main(argv: list[str] | None = None) -> int:
    return _run("ahbf-train", lambda: _train(argv))


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ahbf-eval", allow_abbrev=False, description="Top-1 / top-5 of every branch and every TA of an "
                                "ahbf-train checkpoint on the test split of the data set it was trained on.")
    p.add_argument("checkpoint", help="a checkpoint written by ahbf-train (last.pt, best.pt, epoch_N.pt)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test (the data set's test set) or val (the held-out part of the training set) [default test]")
    p.add_argument("--json", default="", metavar="FILE",
                   help="also write the numbers as JSON: every node's top-1 / top-5 (%%), loss and sample count")
    for flags, key in [(("--dataset",), "data.dataset"), (("--data-dir",), "data.root"),
                       (("-b", "--batch-size"), "data.eval_batch_size"), (("--device",), "train.device"),
                       (("--precision",), "train.precision")]:
        _add_config_flag(p, flags, key)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the checkpoint's config")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    from .eval_export import run_eval

    args = eval_parser().parse_intermixed_args(argv)

    def run():
        flags = [(k, v) for k, v in vars(args).items() if "." in k]
        run_eval(args.checkpoint, args.split, flags + [parse_override(o) for o in args.overrides], args.json)

    return _run("ahbf-eval", run)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ahbf-export", allow_abbrev=False, description="Export trunk + target branch of an ahbf-train "
                                "checkpoint as a plain network's state dict (strict-loadable into "
                                "ahbf.models.create_plain(arch, K), or torchvision's resnet18/34/50).")
    p.add_argument("checkpoint", help="a checkpoint written by ahbf-train")
    p.add_argument("-o", "--output", default="", help="output file [default: <checkpoint folder>/<arch>_target.pt]")
    return p


def export_main(argv: list[str] | None = None) -> int:
    from .eval_export import run_export

    args = export_parser().parse_args(argv)
    return _run("ahbf-export", lambda: run_export(args.checkpoint, args.output))


__all__ = ["ConfigError", "CheckpointError", "train_main", "eval_main", "export_main", "train_parser"]

if __name__ == "__main__":  # torchrun --nproc_per_node N -m ahbf.engine.cli ...
    sys.exit(train_main())
