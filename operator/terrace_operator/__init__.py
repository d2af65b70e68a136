"""terrace_operator."""
