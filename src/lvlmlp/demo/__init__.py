"""The embedded default: a synthetic world, the tiny demo model (assets/) and the demo pipeline."""
