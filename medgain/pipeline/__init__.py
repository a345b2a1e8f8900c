"""medgain.pipeline: multi-stage workflows that compose bundles (attention-guided cropping)."""

from medgain.pipeline.attention_crop import DEFAULT_CONFIG, load_pipeline_config, read_predictions, run_attention_crop
from medgain.pipeline.attention_maps import model_attention_maps

__all__ = ["DEFAULT_CONFIG", "load_pipeline_config", "model_attention_maps", "read_predictions", "run_attention_crop"]
