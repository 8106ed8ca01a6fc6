"""soflow_kernels: fused Triton kernels for the SoFlow loss path.

Each op mirrors a pure-PyTorch reference in ``soflow_core.ops.fused`` with the same signature and
is registered as a ``torch.library`` custom op (namespace ``soflow``), so ``torch.compile``
traces it without graph breaks. soflow_core selects between the two in ``_dispatch``; import
this package directly only to call the kernels yourself.
"""

import importlib.util

if importlib.util.find_spec("triton") is None:
    raise ModuleNotFoundError(
        'soflow_kernels needs Triton: pip install -e ".[triton]" (CUDA builds of torch bring it; Linux only). '
        'soflow_core runs without it: backend="auto" falls back to the PyTorch references.',
        name="triton",
    )

from soflow_kernels._rows import interpreting
from soflow_kernels.consistency import consistency_rows
from soflow_kernels.flow_matching import flow_matching_rows
from soflow_kernels.linear_combination import linear_combination

__all__ = ["INTERPRETED", "consistency_rows", "flow_matching_rows", "linear_combination"]

INTERPRETED: bool = interpreting()
"""Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
