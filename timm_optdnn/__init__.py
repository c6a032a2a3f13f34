"""timm-optdnn: OptDNN (optimization-inspired) vision backbones for timm.

`import timm_optdnn` registers the `optdnn_*` models, so `timm.create_model` finds them.
"""
from .models import SCHEMES, OptDNNConvNeXtIsotropic, OptDNNVisionTransformer, SchemeBlocks

__version__ = "0.1.0"
