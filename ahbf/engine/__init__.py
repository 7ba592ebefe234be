"""Training engine: configuration, the OKD task, the trainer, and the ahbf-train / ahbf-eval / ahbf-export
command lines (``ahbf.engine.cli``)."""
from .config import ConfigError, RunConfig, build_config
from .task import OKDTask
from .trainer import Trainer

__all__ = ["ConfigError", "OKDTask", "RunConfig", "Trainer", "build_config"]
