"""Applications built on the runtime: `anomaly` is what `edgelmm watch` runs."""
