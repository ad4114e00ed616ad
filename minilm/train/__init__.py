"""Training: a composed config in, summary.json out (the loop, the ensemble, diagnostics)."""
