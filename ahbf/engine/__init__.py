"""Training engine: configuration, the OKD task, ``build_run`` (config -> built run), the trainer, and the
ahbf-train / ahbf-eval / ahbf-export command lines (``ahbf.engine.cli``). Map: docs/architecture.md."""
from .config import ConfigError, RunConfig, build_config
from .run import Run, build_run
from .task import OKDTask
from .trainer import Trainer

__all__ = ["ConfigError", "OKDTask", "Run", "RunConfig", "Trainer", "build_config", "build_run"]
