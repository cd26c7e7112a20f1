"""MiniMax Sparse Attention: Python bindings of the msa C++/CUDA library.

The low-level API (``msa.index_topk``, ``msa.sparse_attention_forward``, ...) mirrors
include/msa/ops.h and takes any DLPack array (torch, numpy) with preallocated outputs.
``msa.torch`` (imported on demand, it needs PyTorch) adds torch.library ops, autograd and layers.
"""
import pkgutil as _pkgutil

# Development build: the extension _C lands in <build>/python/msa/ while the .py files stay in
# python/msa/. With both folders on sys.path, this makes the package span both (docs/python.md).
__path__ = _pkgutil.extend_path(__path__, __name__)

from ._errors import ArgumentError, Error, NotSupportedError  # noqa: E402
from ._C import (  # noqa: E402
    Config,
    cuda_available,
    cuda_device_count,
    dense_attention_backward,
    dense_attention_forward,
    index_topk,
    kl_alignment,
    sparse_attention_backward,
    sparse_attention_forward,
    workspace_bytes,
)

__all__ = [
    "ArgumentError",
    "Config",
    "Error",
    "NotSupportedError",
    "cuda_available",
    "cuda_device_count",
    "dense_attention_backward",
    "dense_attention_forward",
    "index_topk",
    "kl_alignment",
    "sparse_attention_backward",
    "sparse_attention_forward",
    "workspace_bytes",
]
__version__ = "0.1.0"

for _cls in (Error, ArgumentError, NotSupportedError):
    _cls.__module__ = "msa"
del _cls
