"""Operations: tracking (W&B), alerts, the model registry, Ray Jobs and sweeps."""
