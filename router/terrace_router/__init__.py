"""terrace_router."""
