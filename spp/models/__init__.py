"""Reference models by name: ResNets (BN-ReLU-Conv, ReLU-BN-Conv, NF-ResNet) and transformers (Pre-LN, Post-LN, NF).

Importing this module does not import torch.
"""

from spp.models.registry import (
    DEPTHS,
    KINDS,
    NORMS,
    REFERENCE_FAMILIES,
    TRANSFORMER_DEPTHS,
    create_model,
    depths,
    get_entry,
    is_model,
    list_models,
    nearest_depth,
    reference_families,
)

__all__ = [
    "DEPTHS",
    "KINDS",
    "NORMS",
    "REFERENCE_FAMILIES",
    "TRANSFORMER_DEPTHS",
    "create_model",
    "depths",
    "get_entry",
    "is_model",
    "list_models",
    "nearest_depth",
    "reference_families",
]
