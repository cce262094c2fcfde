"""Wan's flow-matching schedule (rectified flow with a timestep shift).

Notation follows the paper and Wan: a clean latent ``x0`` and Gaussian ``noise``
are mixed at noise level ``sigma`` in [0, 1],

    x_t = (1 - sigma) * x0 + sigma * noise,

the model is conditioned on ``t = 1000 * sigma`` and predicts the flow
(velocity) ``v = noise - x0``. Hence ``x0 = x_t - sigma * v`` and
``noise = x_t + (1 - sigma) * v``.

The shift warps uniformly spaced base levels ``s`` towards high noise,
``sigma = shift * s / (1 + (shift - 1) * s)`` (Wan uses shift 5 for 480p video),
which is why the paper's few-step list 1000/750/500/250 becomes
1000/937.5/833.3/625 on the model's timestep axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfforcing.errors import SelfForcingError


@dataclass(frozen=True)
class FlowMatchSchedule:
    num_train_timesteps: int = 1000
    shift: float = 5.0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise SelfForcingError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise SelfForcingError(f"timestep shift must be > 0, got {self.shift}")

    # --- noise levels ------------------------------------------------------
    def warp(self, s: torch.Tensor | float) -> torch.Tensor:
        """Shift base noise levels ``s`` in [0, 1] to the model's ``sigma``."""
        s = torch.as_tensor(s, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of model timestep ``t`` (``t = 1000 * sigma``)."""
        return t / self.num_train_timesteps

    def train_timesteps(self) -> torch.Tensor:
        """The 1000 shifted training timesteps, from t = 1000 down (as in Wan/Self-Forcing)."""
        n = self.num_train_timesteps
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        return (self.warp(base) * n).float()

    def few_step_timesteps(self, steps: list[int] | tuple[int, ...] = (1000, 750, 500, 250)) -> torch.Tensor:
        """Map the paper's few-step list onto the shifted schedule.

        Step ``k`` (counted on the unshifted 0..1000 grid) picks the shifted
        training timestep at index ``1000 - k``, exactly as the Self Forcing code
        "warps" its denoising step list.
        """
        n = self.num_train_timesteps
        if not steps:
            raise SelfForcingError("the denoising step list is empty")
        bad = [k for k in steps if not 0 < k <= n]
        if bad:
            raise SelfForcingError(f"denoising steps must lie in (0, {n}], got {bad}")
        if list(steps) != sorted(steps, reverse=True) or len(set(steps)) != len(steps):
            raise SelfForcingError(f"denoising steps must be strictly decreasing, got {list(steps)}")
        table = self.train_timesteps()
        return torch.stack([table[n - k] for k in steps])

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """``num_steps`` shifted timesteps from 1000 to just above 0, for many-step Euler sampling."""
        if num_steps < 1:
            raise SelfForcingError(f"number of sampling steps must be >= 1, got {num_steps}")
        base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return (self.warp(base) * self.num_train_timesteps).float()

    def sample_timesteps(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, low: float = 0.0,
        high: float = 1.0, device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Training timesteps: base noise level uniform in [low, high], warped by the shift
        (DMD's score timesteps use low = 0.02, high = 0.98)."""
        if not 0 <= low <= high <= 1:
            raise SelfForcingError(f"timestep range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
        s = low + (high - low) * torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        return (self.warp(s) * self.num_train_timesteps).float()

    def score_timesteps(
        self, batch: int, generator: torch.Generator | None = None, low: float = 0.02, high: float = 0.98,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Timesteps of the DMD / SiD scores and the critic, drawn as the released Self-Forcing
        code draws them: an integer ``k`` uniform in {0, ..., N-1}, shifted as ``k / N`` would be,
        then clamped to [int(low N), int(high N)] (so the clamp acts on the *shifted* axis)."""
        n = self.num_train_timesteps
        k = torch.randint(0, n, (batch,), generator=generator, device=device).double()
        t = self.warp(k / n).to(k.device) * n
        return t.clamp(int(low * n), int(high * n)).float()

    def nearest_train_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The training timestep nearest to ``t``: the released code reads the noise level of a
        timestep off its table of N shifted training timesteps this way (argmin), while the
        network itself is conditioned on ``t`` unrounded."""
        table = self.train_timesteps().to(t.device, torch.float64)
        return table[(t.double()[..., None] - table).abs().argmin(dim=-1)].float()

    # --- conversions between x_t, x0, noise and the flow v -------------------
    def _expand(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast per-sample ``(B,)`` or per-frame ``(B, F)`` sigmas over ``(B, C, F, H, W)``."""
        sigma = self.sigma(torch.as_tensor(t, device=x.device, dtype=torch.float32))
        if sigma.ndim == 0:
            return sigma
        if sigma.ndim == 1:
            return sigma.view(-1, 1, 1, 1, 1)
        return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._expand(t, x0)
        return ((1 - sigma) * x0 + sigma * noise).type_as(x0)

    def x0_from_flow(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (xt - self._expand(t, xt) * v).type_as(xt)

    @staticmethod
    def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Regression target of the flow-matching loss."""
        return noise - x0
