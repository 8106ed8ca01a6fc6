"""The fused loss-path ops: pure-PyTorch references, the dispatching wrappers and backend selection.

This is the only part of soflow_core that imports the Triton kernels (``soflow_kernels``), and
only lazily, on the first call that resolves to them; ``import soflow_core`` never imports
Triton. The maths that produces each op's coefficients lives with the paths,
parameterizations, guidance and losses; see [Kernels](../kernels.md).
"""

from soflow_core.ops._dispatch import BACKENDS, Backend, kernels_available, kernels_interpreted, resolve_backend
from soflow_core.ops.fused import (
    consistency_rows,
    consistency_rows_reference,
    flow_matching_rows,
    flow_matching_rows_reference,
    linear_combination,
    linear_combination_reference,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "consistency_rows",
    "consistency_rows_reference",
    "flow_matching_rows",
    "flow_matching_rows_reference",
    "kernels_available",
    "kernels_interpreted",
    "linear_combination",
    "linear_combination_reference",
    "resolve_backend",
]
