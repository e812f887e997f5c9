"""The networks, their loaders and generation. Importing ``ascend`` first keeps ``import torch`` working on
hosts where torch-npu is installed but CANN is not (see ascend/__init__.py)."""
import ascend  # noqa: F401
