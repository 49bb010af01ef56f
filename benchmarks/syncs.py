"""Counting the host syncs a piece of code makes.

A *visible* sync is Python reading a tensor's value: ``.item()``, ``.tolist()``, ``int(t)``,
``float(t)``, ``bool(t)`` (``if t:``). On a GPU each one waits for every queued kernel. A
*hidden* sync is one an op makes on its own (``nonzero``, boolean-mask indexing, a
``.to("cpu")``), which only CUDA's sync debug mode reports.

``HostReads`` counts the visible ones on any device (so a CPU test can show that a loop reads
nothing back); ``cuda_syncs`` counts all of them on CUDA (hidden = that minus visible).
"""

import contextlib
import os
import sys
import warnings

import torch

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


class HostReads:
    """Counts the values code outside torch reads off tensors inside the block, by method.

    Reads inside torch itself (an optimizer reading its CPU step counters, ...) are left out:
    on a GPU they are either of CPU tensors (no sync) or syncs of its own (hidden ones).

    >>> with HostReads() as reads:
    ...     _ = torch.ones(2).sum().item()
    >>> reads.total
    1
    """

    def __enter__(self):
        self.counts = dict.fromkeys(READS, 0)
        self.saved = {name: torch.Tensor.__dict__.get(name) for name in READS}
        self.depth = 0
        for name in READS:
            setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        return self

    def _counting(self, name, method):
        def counted(tensor, *args, **kwargs):
            self.depth += 1
            try:
                # A read made by another read (tolist via __index__) counts once.
                if self.depth == 1 and not sys._getframe(1).f_code.co_filename.startswith(TORCH_DIR):
                    self.counts[name] += 1
                return method(tensor, *args, **kwargs)
            finally:
                self.depth -= 1

        return counted

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def cuda_syncs():
    """Every host sync CUDA makes inside the block (visible and hidden); yields a list that
    holds one message per sync when the block ends."""
    found = []
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
