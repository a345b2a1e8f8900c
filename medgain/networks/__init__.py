"""medgain.networks: classifier registry with default Grad-CAM layers."""

from medgain.networks.classifiers import TARGET_LAYERS, build_classifier

__all__ = ["TARGET_LAYERS", "build_classifier"]
