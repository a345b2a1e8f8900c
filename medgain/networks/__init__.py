"""medgain.networks: classifier registry with default Grad-CAM layers, and the recurrent glimpse model."""

from medgain.networks.architectures import ARCHITECTURES, Architecture, register_architecture
from medgain.networks.chipnet import ChipNet
from medgain.networks.classifiers import IMAGENET_NORMALIZATION, TARGET_LAYERS, build_classifier, default_normalization
from medgain.networks.fusion import FusionClassifier, backbone_features
from medgain.networks.param_groups import backbone_head_param_groups
from medgain.networks.glimpse import (
    GlimpseLogitsNetwork,
    GlimpseOutput,
    RecurrentGlimpseNetwork,
    gaussian_filterbank,
    gaussian_glimpses,
    glimpse_encoder,
    glimpse_geometry,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "register_architecture",
    "ChipNet",
    "FusionClassifier",
    "backbone_features",
    "backbone_head_param_groups",
    "IMAGENET_NORMALIZATION",
    "default_normalization",
    "TARGET_LAYERS",
    "GlimpseLogitsNetwork",
    "GlimpseOutput",
    "RecurrentGlimpseNetwork",
    "build_classifier",
    "gaussian_filterbank",
    "gaussian_glimpses",
    "glimpse_encoder",
    "glimpse_geometry",
]
