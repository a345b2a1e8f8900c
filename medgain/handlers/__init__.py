"""medgain.handlers: GAIN training, evaluator-side Grad-CAM, metrics and the artifacts a clinical team reviews."""

from medgain.handlers.attention_in_mask import AttentionInMask
from medgain.handlers.attention_iou import AttentionIoU
from medgain.handlers.attention_outside_fov import AttentionOutsideFOV
from medgain.handlers.attention_overlay import AttentionOverlaySaver
from medgain.handlers.auc import AUC
from medgain.handlers.best_checkpoint import BestModelSaver
from medgain.handlers.buffered_mlflow import BufferedMLFlowHandler
from medgain.handlers.cam_inferer import GradCamInferer
from medgain.handlers.tta_inferer import DIHEDRAL_VIEWS, TTAGradCamInferer
from medgain.handlers.checkpoint_pruner import CheckpointPruner
from medgain.handlers.chip_inferer import ChipAttentionInferer
from medgain.handlers.checkpoint_saver import TrainingCheckpointSaver
from medgain.handlers.classification_metrics import ClassificationMetrics
from medgain.handlers.failure import TrainingFailureHandler
from medgain.handlers.gain import GAINHandler, gain_loss_terms
from medgain.handlers.glimpse_inferer import GlimpseInferer
from medgain.handlers.glimpse_loss import GlimpseLossHandler, glimpse_loss_terms
from medgain.handlers.glimpse_metrics import GlimpseStatistic, glimpse_metrics, glimpse_records, glimpse_statistics
from medgain.handlers.glimpse_overlay import GlimpseOverlaySaver, draw_glimpses
from medgain.handlers.glimpse_predictions import GlimpsePredictionWriter
from medgain.handlers.heatmap_writer import HeatmapWriter
from medgain.handlers.metrics_json import MetricsJSONWriter
from medgain.handlers.model_registration import ModelRegistration
from medgain.handlers.nonfinite_loss import NonFiniteLossError, NonFiniteLossHandler
from medgain.handlers.operating_point import OperatingPointMetrics
from medgain.handlers.prediction_writer import PredictionCSVWriter
from medgain.handlers.resume import ResumeFromCheckpoint
from medgain.handlers.roc_plot import ROCCurveSaver
from medgain.handlers.sampler_epoch import SamplerEpoch
from medgain.handlers.slide_evaluation import SlideEvaluation
from medgain.handlers.study_report import StudyReportWriter
from medgain.handlers.run_tags import RunTags
from medgain.handlers.run_summary import RunSummary
from medgain.handlers.tpr_at_fpr import TPRAtFPR
from medgain.handlers.unveil_panels import UnveilPanelSaver

__all__ = [
    "AUC",
    "AttentionInMask",
    "AttentionIoU",
    "AttentionOutsideFOV",
    "AttentionOverlaySaver",
    "BestModelSaver",
    "BufferedMLFlowHandler",
    "CheckpointPruner",
    "ChipAttentionInferer",
    "ClassificationMetrics",
    "GAINHandler",
    "GlimpseInferer",
    "GlimpseLossHandler",
    "GlimpseOverlaySaver",
    "GlimpsePredictionWriter",
    "GlimpseStatistic",
    "GradCamInferer",
    "DIHEDRAL_VIEWS",
    "TTAGradCamInferer",
    "HeatmapWriter",
    "MetricsJSONWriter",
    "ModelRegistration",
    "NonFiniteLossError",
    "NonFiniteLossHandler",
    "OperatingPointMetrics",
    "PredictionCSVWriter",
    "ROCCurveSaver",
    "ResumeFromCheckpoint",
    "SamplerEpoch",
    "SlideEvaluation",
    "StudyReportWriter",
    "RunTags",
    "RunSummary",
    "TPRAtFPR",
    "TrainingCheckpointSaver",
    "TrainingFailureHandler",
    "draw_glimpses",
    "gain_loss_terms",
    "glimpse_loss_terms",
    "glimpse_metrics",
    "glimpse_records",
    "glimpse_statistics",
    "UnveilPanelSaver",
]
