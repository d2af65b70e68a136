"""terrace_runtime: one model per process, served over OIP v2 and the OpenAI API."""

__version__ = "0.1.0"
