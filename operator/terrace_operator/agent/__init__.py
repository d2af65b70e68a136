"""terrace-agent: applies the GPU power limits the operator decided.

The operator never talks to a GPU; the agent never decides a limit. The
contract between them is two Node annotations (see `protocol.py`).
"""
