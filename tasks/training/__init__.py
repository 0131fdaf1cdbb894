"""Training: the Ray Train driver, the per-worker loop and its worker context, the recipe, checkpoints."""
