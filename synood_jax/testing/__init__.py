"""PyTorch references shared by tests/ and benchmarks/ (torch only; nothing in the library imports this)."""
