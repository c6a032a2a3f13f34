"""Importing this package registers every OptDNN model with timm."""
from .convnext_iso import OptDNNConvNeXtIsotropic
from .mlp import OptDNNMLP
from .schemes import SCHEMES, SchemeBlocks
from .vit import OptDNNVisionTransformer
