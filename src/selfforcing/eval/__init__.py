"""Evaluation of generated toy-world videos: per-frame metrics, so error accumulation shows.

:func:`evaluate_videos` computes everything against real clips; :func:`write_report`
writes the result as JSON plus one plot per per-frame metric.
"""

from selfforcing.eval.metrics import (
    Detections,
    color_drift,
    color_statistics,
    detect,
    estimate_background,
    evaluate_videos,
    frame_features,
    frechet_distance,
    jerk,
    motion_agreement,
    persistence,
    reference_coverage,
    reference_weights,
    saturation_brightness,
    semantic_accuracy,
    semantic_parts,
    speed,
    total_score,
    windowed_fd,
)
from selfforcing.eval.report import write_report

__all__ = [
    "Detections",
    "color_drift",
    "color_statistics",
    "detect",
    "estimate_background",
    "evaluate_videos",
    "frame_features",
    "frechet_distance",
    "jerk",
    "motion_agreement",
    "persistence",
    "reference_coverage",
    "reference_weights",
    "saturation_brightness",
    "semantic_accuracy",
    "semantic_parts",
    "speed",
    "total_score",
    "windowed_fd",
    "write_report",
]
