"""Reference models (BN-ReLU-Conv, ReLU-BN-Conv, NF-ResNet) by name. Importing this module does not import torch."""

from spp.models.registry import (
    DEPTHS,
    NORMS,
    REFERENCE_FAMILIES,
    create_model,
    get_entry,
    is_model,
    list_models,
    nearest_depth,
)

__all__ = [
    "DEPTHS",
    "NORMS",
    "REFERENCE_FAMILIES",
    "create_model",
    "get_entry",
    "is_model",
    "list_models",
    "nearest_depth",
]
