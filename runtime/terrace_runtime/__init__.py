"""terrace_runtime."""
