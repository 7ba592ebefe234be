"""Run configuration: one small frozen dataclass per component, grouped in ``RunConfig``.

Each field's docstring is its documentation and its CLI help (see ``field_docs``). The built-in
defaults are the digits demo (``ahbf-train`` with no arguments); ``configs/*.yaml`` hold the paper's runs.
YAML files and ``section.key=value`` overrides are merged onto the defaults; an unknown key is a
``ConfigError`` (``checks.py``) naming the nearest known key. The checks of the values (choices, ranges) are
``checks.py``, the per-dataset base values ``recipes.py``; neither imports this module.

A config is immutable: every step returns a new one (``set_value``, ``RunConfig.replace``, ``checks.validate``,
``resolve.resolve``), so the object a run was built from is the one ``config.yaml`` records.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..pipelines import DataConfig
from .checks import ConfigError, validate
from .recipes import chosen_recipe, recipe_values


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet8"
    """architecture: resnet8/14/20/32/44/56/110 (CIFAR-style), resnet18/34/50 (ImageNet-style), vgg16/19, densenet*, mobilenetv2_x0_5, or a library model torchvision:<name> / timm:<name> (docs/models.md)"""
    method: str = "ahbf"
    """online-KD method (ahbf/methods/, table in docs/methods.md: model, families, defaults); baseline = a plain single network; or your own method's import path, module:name (docs/methods.md)"""
    num_branches: int = 4
    """number of branches M (ignored by baseline)"""
    aux: int | str = "auto"
    """extra blocks per hierarchy level of AHBF branches (>= 0); auto = SPEC default (4 CIFAR, 2 ImageNet; 0 for one/dml)"""
    split: str = "auto"
    """torchvision:/timm: models only: the stage where the branches start, e.g. layer3, stages.3, features.6 (the trunk is everything before it); auto = the family default (docs/models.md)"""


@dataclass(frozen=True)
class ObjectiveConfig:
    T: float = 3.0
    """distillation temperature"""
    kd_weight: float | str = "auto"
    """weight of the KD terms (kd_scale = ramp(epoch) * kd_weight, >= 0); auto = the method's default (docs/methods.md table: 1.5 for ahbf)"""
    lambda1: float = 1.0
    """AHBF: weight of the ensemble-KD (TA) terms L_ekd"""
    lambda2: float = 1.0
    """AHBF: weight of the branch-to-branch terms L_dkd"""
    ramp: str = "auto"
    """KD weight ramp: sigmoid (0.5*exp(-5(1-e/R)^2)) | consistency (exp(-5(1-e/R)^2)) | constant (1) | auto (the method's default, docs/methods.md table)"""
    rampup: float | str = "auto"
    """ramp-up length R in epochs of the sigmoid / consistency ramp; 0 = no ramp (0.5 / 1 from the start); auto = the method's fraction of train.epochs (docs/methods.md table: AHBF 240 of 300, ONE / CL-ILR / OKDDip / PCL 80 of 300)"""
    detach_teacher: bool | str = "auto"
    """stop gradients into the teacher side of KL terms: true | false | auto (as the method's public code, docs/methods.md table)"""
    kdcl_target: str = "minlogit"
    """KDCL soft target: minlogit (min over peers of z - z_label) | naive (the peers' mean logits)"""
    ema_decay: float = 0.999
    """PCL: decay of the temporal-mean (EMA) network, in [0, 1)"""
    pcl_target: str = "mean_logits"
    """PCL peer mean teacher: mean_logits (one KL to the mean of the other EMA peers' logits) | mean_kl (the mean of the KLs to each, as the public reproduction)"""
    eps: float = 0.0
    """added to the teacher probabilities inside every KL: 0 = the exact KL; 1e-7 = the public code of AHBF, ONE, CL-ILR and OKDDip (not the Triton backend: auto runs compiled)"""
    ce_weight: float = 1.0
    """weight of the cross-entropy terms (loss = ce_weight * CE + kd_scale * KD, > 0); KDCL's public (1-a) CE + a KL: ce_weight = 1-a, kd_weight = a"""
    backend: str = "auto"
    """objective implementation: auto | triton | compiled | eager (the unfused reference)"""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1
    """peak learning rate (per optimiser step, not scaled by world size)"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = True
    """Nesterov momentum"""
    weight_decay: float = 5e-4
    """L2 weight decay (applied to every parameter, like the reference)"""
    impl: str = "auto"
    """SGD implementation: auto (fused; foreach under fp16 loss scaling) | fused | foreach | loop | apex (needs apex)"""
    clip_grad: float = 0.0
    """clip the global gradient norm to this value; 0 = off"""
    lr_base_batch: int = 0
    """linear lr scaling: lr = optim.lr x global batch / lr_base_batch (global batch = data.batch_size x world size); 0 = off"""


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"
    """learning-rate schedule: multistep (x gamma at each milestone, stepped after each epoch) | cosine"""
    milestones: tuple[int, ...] = (150, 225)
    """multistep: epochs at which the learning rate is multiplied by gamma"""
    gamma: float = 0.1
    """multistep: decay factor"""
    warmup_epochs: float = 2.0
    """linear warm-up length in epochs (per step, from lr/steps to lr); 0 = none"""
    min_lr: float = 0.0
    """cosine: final learning rate"""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    """number of training epochs"""
    output: str = ""
    """output folder (checkpoints, config.yaml, metrics.csv, TensorBoard logs, curves.png); empty = runs/<name>, or runs/<dataset>-<arch>-<method>-<date-time> without a name"""
    name: str = ""
    """run name: the output folder is runs/<name> (wins over train.output; config.yaml records the folder as train.output)"""
    resume: str = ""
    """resume from: auto (= <output>/last.pt if it exists, else the previous good one), a run folder or a checkpoint (without -o / --name: continue that run in its folder with its recorded config; the flags given are listed; a folder refuses changes that make it another run, as auto does, a checkpoint file continues with them, noted)"""
    seed: int = 0
    """random seed of the model initialisation (the data streams use data.seed)"""
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda | cuda:N"""
    precision: str = "auto"
    """fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA) | auto (bf16 on GPUs that support it and on CPUs with native bf16, AVX512-BF16 / AMX; else fp16 on GPUs, fp32 on CPUs) | fp64 (float64 weights and images, no autocast: exact comparisons across machines, numerical debugging; slow)"""
    channels_last: bool = True
    """channels-last memory format for the model and the images"""
    compile: str = "off"
    """torch.compile: off | model (the whole model as one graph) | branches (trunk, each branch and each fusion module as its own graph) | regions (each repeated block compiled once and reused: the fastest cold compile)"""
    compile_mode: str = "default"
    """torch.compile mode: default | reduce-overhead (CUDA graphs: fewer kernel launches for small models) | max-autotune"""
    cuda_graph: bool = False
    """replay the whole training step (forward, objective, backward, optimiser) as one CUDA graph after 2 warm-up steps; where it cannot be captured (fp16, several processes, a non-fused optimiser, compile_mode=reduce-overhead) the eager step runs, with a note"""
    threads: int = 0
    """CPU threads of torch (torch.set_num_threads, set before any work); 0 = auto: OMP_NUM_THREADS if set, else the cores this process may use (affinity) / processes on this node; the header says which"""
    sync_bn: bool = False
    """under DDP, convert BatchNorm to SyncBatchNorm (batch statistics over the global batch)"""
    deterministic: bool = False
    """deterministic algorithms (bitwise-reproducible runs and resumes; slower on GPU)"""
    log_interval: int = 20
    """steps between reads of the loss on the host (logging and the non-finite check)"""
    save_every: int = 0
    """also keep epoch_N.pt every N epochs; 0 = only last.pt and best.pt"""
    checkpoint_every: str = "30m"
    """also write last.pt within an epoch every N steps ('500') or minutes ('30m'); off (or 0) = at epoch ends only"""
    precise_bn: int = 0
    """precise BatchNorm: after every epoch, before val chooses best.pt, set every BatchNorm's running mean / var to the exact statistics of N training batches (train mode, no grad; summed over ranks); 0 = off. Short runs' running statistics lag the weights"""
    stop_poll_every: int = 1
    """steps between the ranks' agreements on a stop signal / a timed checkpoint (one CPU all-reduce under DDP); a step-interval checkpoint is always agreed at its step; 1 = every step"""
    keep_last: int = 2
    """checkpoints kept: last.pt plus last.1.pt ... (older ones); --resume auto falls back to them if last.pt is bad"""
    overwrite: bool = False
    """start afresh in an output folder that holds a previous run (deletes its checkpoints); default: refuse"""
    dist_timeout: float = 600.0
    """seconds a collective may wait for the other ranks (a hung or stopped rank) before the run fails"""
    progress: bool = True
    """tqdm progress bars on rank 0 when the output is a terminal; otherwise (or off) a plain line every log_interval steps"""
    tensorboard: bool = True
    """write TensorBoard event files under <output>/tb"""


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig,
                             "optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig}


def demo_data() -> DataConfig:
    """The demo's data: digits at 16 px (they are 8 x 8 originals), batch 64."""
    return DataConfig(dataset="digits", image_size=16, batch_size=64)


def demo_objective() -> ObjectiveConfig:
    """The demo's objective: the eager reference. On CPU, ``auto`` means ``compiled``, whose first
    torch.compile (cold cache) took 15 s on an idle 2-core CPU and up to 130 s on a busy one, and did
    not speed up the demo's step (1.1 s per epoch either way)."""
    return ObjectiveConfig(backend="eager")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. The defaults are the digits demo; ``configs/*.yaml`` set every key."""

    data: DataConfig = field(default_factory=demo_data)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=demo_objective)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with sections changed: each given as a section object or a ``{field: value}`` dict of changes
        (values as typed, not coerced: for code; user input goes through ``set_value``)."""
        new = {name: dataclasses.replace(getattr(self, name), **v) if isinstance(v, dict) else v
               for name, v in sections.items()}
        return dataclasses.replace(self, **new)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain YAML / checkpoint data: sections of ``{field: value}``, tuples as lists."""
        return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
                for name, section in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def dump_yaml(data: dict[str, dict[str, Any]]) -> str:
    """Block-style sections, one ``key: value`` per line (lists inline): easy to read and to diff."""
    lines = []
    for section, values in data.items():
        lines.append(f"{section}:")
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            lines.append(f"  {key}: {text.removesuffix('...').strip()}")
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ConfigError:
    keys = all_keys()
    near = difflib.get_close_matches(key, keys + list(SECTIONS), n=1, cutoff=0.6)
    if not near:  # a bare or misplaced field name: compare the last part only
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f"; did you mean '{near[0]}'?" if near else f"; sections are {', '.join(SECTIONS)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check / convert ``value`` to the field type ``typ`` (YAML and CLI strings both arrive here)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(options) > 1:  # e.g. bool | str ("auto"): the first type that takes the value
            for option in options:
                try:
                    return _coerce(key, value, option)
                except ConfigError:
                    pass
            names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
            raise ConfigError(f"config key '{key}': expected {names}, got {value!r}")
        (typ,) = options
        origin = typing.get_origin(typ)
    if origin is tuple:
        item = typing.get_args(typ)[0]  # tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            value = [value]
        # "10,20", "10 20" and ["10,20"] (a CLI flag with nargs) all mean [10, 20]
        value = [part for v in value for part in (str(v).replace(",", " ").split() if isinstance(v, str) else [v])]
        return tuple(_coerce(key, v, item) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"config key '{key}': expected {getattr(typ, '__name__', typ)}, got {value!r}")


def set_value(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """``cfg`` with ``section.field`` set (type-checked); an unknown key raises ``ConfigError`` with a suggestion."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise _unknown(key)
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise _unknown(key)
    return cfg.replace(**{section: {name: _coerce(key, value, hints[name])}})


def merge_dict(cfg: RunConfig, data: dict[str, Any], source: str = "config") -> RunConfig:
    """``cfg`` with a nested ``{section: {field: value}}`` mapping (e.g. from YAML) merged onto it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for name, value in values.items():
            cfg = set_value(cfg, f"{section}.{name}", value)
    return cfg


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    return data or {}


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(files: list[str] = (), overrides: list[tuple[str, Any]] = (),
                 base: RunConfig | None = None) -> RunConfig:
    """Defaults (or ``base``), then YAML files in order, then (key, value) overrides in order; validated.

    Without files, a ``data.dataset`` override that has a recipe (``ahbf/recipes/<dataset>.yaml``) applies that
    data set's paper values first, so the digits demo's defaults do not leak into it; a file with a top-level
    ``recipe: <dataset>`` key starts from that recipe (``configs/*.yaml`` are such overlays). ``base`` (a run's
    recorded config, ``--resume <run folder>``) already holds its recipe's values: none is applied again."""
    cfg = base or RunConfig()
    recipe = "" if base else chosen_recipe(files, overrides)
    if recipe:
        cfg = merge_dict(cfg, recipe_values(recipe), source=f"recipe {recipe}")
    for path in files:
        data = load_yaml(path)
        if isinstance(data, dict) and "recipe" in data:  # an overlay: the data set's recipe first, then the file
            data = dict(data)
            cfg = merge_dict(cfg, recipe_values(str(data.pop("recipe")), source=path), source=path)
        cfg = merge_dict(cfg, data, source=path)
    for key, value in overrides:
        cfg = set_value(cfg, key, value)
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return merge_dict(RunConfig(), data, source="checkpoint config")


def reference_markdown() -> str:
    """The config reference as a Markdown table (docs/training.md embeds it; a test keeps it current)."""
    defaults = RunConfig().to_dict()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = defaults[section][f.name]
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            meaning = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | `{shown}` | {meaning} |")
    return "\n".join(lines)
