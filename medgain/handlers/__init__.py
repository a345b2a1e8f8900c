"""medgain.handlers: GAIN training, evaluator-side Grad-CAM, metrics and the artifacts a clinical team reviews."""

from medgain.handlers.attention_in_mask import AttentionInMask
from medgain.handlers.attention_iou import AttentionIoU
from medgain.handlers.attention_overlay import AttentionOverlaySaver
from medgain.handlers.auc import AUC
from medgain.handlers.best_checkpoint import BestModelSaver, load_model_weights, load_operating_point
from medgain.handlers.cam_inferer import GradCamInferer
from medgain.handlers.classification_metrics import classification_metrics
from medgain.handlers.failure import TrainingFailureHandler
from medgain.handlers.gain import GAINHandler, gain_loss_terms
from medgain.handlers.heatmap_writer import HeatmapWriter
from medgain.handlers.metrics_json import MetricsJSONWriter
from medgain.handlers.prediction_writer import PredictionCSVWriter
from medgain.handlers.resume import ResumeFromCheckpoint
from medgain.handlers.roc_plot import ROCCurveSaver
from medgain.handlers.tpr_at_fpr import TPRAtFPR

__all__ = [
    "AUC",
    "AttentionInMask",
    "AttentionIoU",
    "AttentionOverlaySaver",
    "BestModelSaver",
    "GAINHandler",
    "GradCamInferer",
    "HeatmapWriter",
    "MetricsJSONWriter",
    "PredictionCSVWriter",
    "ROCCurveSaver",
    "ResumeFromCheckpoint",
    "TPRAtFPR",
    "TrainingFailureHandler",
    "classification_metrics",
    "gain_loss_terms",
    "load_model_weights",
    "load_operating_point",
]
