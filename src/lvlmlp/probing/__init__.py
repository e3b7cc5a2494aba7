"""Probing: feature views of a run, probes, metrics, baselines and probe evaluation."""
