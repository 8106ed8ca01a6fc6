"""Leaving a process group so that a finished run exits cleanly.

``torch.distributed.destroy_process_group`` drops the process group from ``torch.distributed``'s
tables; the gloo backend's worker threads end only when the group object itself is destroyed.
Under FSDP2 that does not happen before the interpreter shuts down: PyTorch's DTensor caches
(sharding propagation, redistribution plans, mesh topology) keep each device mesh alive, and a
mesh holds its process groups. A gloo worker drops a finished collective a moment after the
caller's ``wait`` returns, and dropping one that held tensors Python has seen takes the GIL; if
that moment falls inside interpreter shutdown, the thread is ended inside a C++ destructor and
the process aborts (SIGABRT, "terminate called without an active exception") with all its work
done. Under torchrun the launcher then reports the whole run failed.
"""

import gc
import importlib
from collections.abc import Callable

import torch.distributed as dist

__all__ = ["destroy_process_group"]

# PyTorch's own functions that empty the DTensor caches holding device meshes, as (module, attribute
# path). They are private and vary between versions, so each is looked up and skipped when absent;
# tests/test_process_group.py checks on the installed PyTorch that no gloo thread outlives the call.
_MESH_CACHE_CLEARERS = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def destroy_process_group() -> None:
    """Destroy every process group and end its gloo worker threads while Python still runs.

    A drop-in for ``torch.distributed.destroy_process_group()`` at the end of a run: call it once
    the model, optimizer and EMA are unreachable (e.g. after the function that trained returns).
    It collects garbage (FSDP2 modules hold reference cycles), empties the DTensor caches that keep
    device meshes and their process groups alive, collects again and destroys the groups, so the
    group objects are freed now and their worker threads joined. See the module docstring for the
    abort this prevents. Does nothing when no process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    for module, path in _MESH_CACHE_CLEARERS:
        clear = _lookup(module, path)
        if clear is not None:
            clear()
    gc.collect()
    dist.destroy_process_group()


def _lookup(module: str, path: str) -> Callable[[], object] | None:
    """``module.path`` if that module imports and has it, else None."""
    try:
        target: object = importlib.import_module(module)
    except ImportError:
        return None
    for name in path.split("."):
        target = getattr(target, name, None)
    return target if callable(target) else None
