"""The built-in model zoo. Importing this package registers every architecture."""

from pipeline.models import bert, cnn  # noqa: F401  (registration side effect)
from pipeline.models.registry import ZooEntry, get_model, list_models, register_model

__all__ = ["ZooEntry", "get_model", "list_models", "register_model"]
