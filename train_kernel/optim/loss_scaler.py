"""The dynamic loss scaler with InternLM's (ColossalAI's) exact semantics.

- An overflow step adds one to the hysteresis counter and resets the growth counter; once the
  counter reaches ``hysteresis`` the scale backs off, and keeps backing off on every further
  overflow until a growth resets the counter (InternLM does not reset it on backoff).
- ``growth_interval`` overflow-free steps in a row multiply the scale by ``growth_factor`` and reset
  both counters.
- The scale stays within [min_scale, max_scale].
bf16 and fp32 runs use a constant scale of 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DynamicLossScaler:
    initial_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float | None = 1.0
    max_scale: float | None = 2.0**24
    hysteresis: int = 2
    enabled: bool = True

    def __post_init__(self) -> None:
        self.scale = float(self.initial_scale) if self.enabled else 1.0
        self._growth_step = 0
        self._hysteresis_step = 0

    def update(self, overflow: bool) -> None:
        """Called once per optimizer step, after the global overflow check."""
        if not self.enabled:
            return
        if overflow:
            self._hysteresis_step += 1
            self._growth_step = 0
            if self._hysteresis_step >= self.hysteresis:
                self.scale *= self.backoff_factor
                if self.min_scale:
                    self.scale = max(self.scale, float(self.min_scale))
        else:
            self._growth_step += 1
            if self._growth_step == self.growth_interval:
                self._growth_step = 0
                self._hysteresis_step = 0
                self.scale *= self.growth_factor
                if self.max_scale:
                    self.scale = min(self.scale, float(self.max_scale))

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_step": self._growth_step,
            "hysteresis_step": self._hysteresis_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_step = int(state["growth_step"])
        self._hysteresis_step = int(state["hysteresis_step"])
