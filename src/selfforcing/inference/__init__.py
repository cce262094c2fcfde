from selfforcing.inference.pipeline import SamplingConfig, StreamingPipeline, StreamStats, VideoChunk
from selfforcing.inference.rollout import rollout

__all__ = ["SamplingConfig", "StreamingPipeline", "StreamStats", "VideoChunk", "rollout"]
