"""KubeMaaS runtime: one PyTorch model served over the Open Inference Protocol (KServe v2)."""

__version__ = "0.1.0"
