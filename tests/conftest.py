import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this variable
# when a kernel is decorated, so it must be set before anything imports soflow_kernels;
# backend="auto" never picks the interpreter, so the rest of the suite is unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
