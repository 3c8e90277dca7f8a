"""silmm: self-improving large multimodal models as resumable batch jobs."""

__version__ = "0.1.0"
