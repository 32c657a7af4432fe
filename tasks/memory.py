"""Memory accounting, one definition for the three scripts: a client's peak_memory_bytes is

    held + step
    held  the bytes of the tensors the client holds before a step: the model's weights, and per script what it keeps
          beside them (FedKSeed: w0, and the float32 weights apart from a --compute_dtype copy; FedCyBGD: the fp32
          masters of bf16/fp16 blocks); tensor bytes, `tensor_bytes`
    step  the peak bytes of the tensors allocated during one local step and alive at once (`PeakAllocations`): the
          forward's activations and logits, temporaries, and for an optimizer step the gradients, the backward's
          buffers and the optimizer state it creates. A ZO step keeps no activations between its forwards, so its
          step bytes are one forward's peak.

Both are counted as tensor bytes, the same way on a CPU and a GPU (not the process's RSS, which holds the allocator's
caches, the Python heap and, in one process, every simulated client). The step measured is a client's first of the
round: its optimizer state is created there.

    held = tasks.tensor_bytes(tensors)
    with tasks.PeakAllocations() as step:
        ...one step...
    peak = held + step.peak
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PeakAllocations(TorchDispatchMode):
    """The peak, over the `with` block, of the bytes of tensor storages allocated inside it and alive at once. Every
    op's outputs are seen as it returns: a storage that is not one of the op's inputs' (in-place results and views are)
    and not seen before is counted, and uncounted when it is freed (a weakref on its storage). -> `.peak` bytes."""

    def __init__(self):
        super().__init__()
        self.live, self.bytes, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in inputs or key in self.live or size == 0:
                continue
            self.live[key] = size
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key):
        self.bytes -= self.live.pop(key, 0)
