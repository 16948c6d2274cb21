"""loadgen: the trace replay tool (not built yet; bench/ holds the benchmarks for now)."""
