"""latentforge: a research training framework for small and medium models whose interesting part is a latent."""

from latentforge.api import Run, evaluate_run, load_run, resume, train
from latentforge.config import Config, load_config

__all__ = ["Config", "Run", "evaluate_run", "load_config", "load_run", "resume", "train"]
__version__ = "0.1.0"
