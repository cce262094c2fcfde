from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.diffusion.samplers import euler_sample_cfg, few_step_denoise

__all__ = ["FlowMatchSchedule", "euler_sample_cfg", "few_step_denoise"]
