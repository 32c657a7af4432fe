"""Memory accounting: the bytes a client's step needs, counted as tensor bytes so that a CPU and a GPU count alike.

    counter = tasks.SavedActivations(model)   # `with counter:` around a forward -> counter.bytes saved for backward
    n = tasks.tensor_bytes(tensors)           # sum of numel x element size
"""
import torch


class SavedActivations:
    """Counts the bytes autograd saves for backward (deduplicated by storage, parameters excluded):
    the activation part of a step's memory, measured the same way on CPU and GPU."""

    def __init__(self, model):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        self.seen, self.bytes = set(), 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
