"""fastattn.optim: optimizers that go with the models (SAM)."""
from .sam import SAM

__all__ = ["SAM"]
