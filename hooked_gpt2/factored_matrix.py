"""FactoredMatrix: a (batch of) low-rank matrix ``A @ B`` kept as its two factors.

``model.OV`` is ``W_V @ W_O`` and ``model.QK`` is ``W_Q @ W_K^T`` per layer and head:
d_model x d_model matrices of rank d_head, which this class multiplies, indexes and
decomposes (SVD, eigenvalues, norm) without forming them, with TransformerLens's names
so that notebooks written against ``transformer_lens.FactoredMatrix`` run unchanged.
"""

from functools import cached_property

import einops
import torch
from jaxtyping import Float
from torch import Tensor


class FactoredMatrix:
    """``A [... ldim mdim] @ B [... mdim rdim]``, leading axes broadcast.

    ``AB`` forms the product; ``BA`` the small ``[... mdim mdim]`` one (when ldim == rdim),
    which has the same non-zero eigenvalues.
    """

    def __init__(self, A: Float[Tensor, "... ldim mdim"], B: Float[Tensor, "... mdim rdim"]):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.shape = torch.Size((*leading, self.ldim, self.rdim))
        self.A = A.broadcast_to((*leading, self.ldim, self.mdim))
        self.B = B.broadcast_to((*leading, self.mdim, self.rdim))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self.A, self.B

    @property
    def AB(self) -> Float[Tensor, "... ldim rdim"]:
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... mdim mdim"]:
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix, this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:
            return (self.A @ (self.B @ other[..., None]))[..., 0]
        # Keep the smaller inner dimension.
        return FactoredMatrix(self.A, self.B @ other) if self.rdim > self.mdim else FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        if other.ndim < 2:
            return ((other[..., None, :] @ self.A) @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B) if self.ldim > self.mdim else FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got shape {tuple(scalar.shape)}; use @ for products")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # SVD of each factor, then of the small middle matrix: never forms A @ B.
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = ((Sa[..., :, None] * Vha) @ Ub) * Sb[..., None, :]  # TransformerLens's order, so that
        # near-equal singular values resolve to the same vectors (and refactored weights match)
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, Vhb.transpose(-2, -1) @ Vhm.transpose(-2, -1)

    def svd(self) -> tuple[Float[Tensor, "... ldim mdim"], Float[Tensor, "... mdim"], Float[Tensor, "... rdim mdim"]]:
        """``U, S, V`` with ``AB == U @ diag(S) @ V^T`` (V, not Vh, as in TransformerLens)."""
        return self._svd

    U = property(lambda self: self._svd[0])
    S = property(lambda self: self._svd[1])
    V = property(lambda self: self._svd[2])
    Vh = V  # TransformerLens's older (misleading) name for V

    @property
    def eigenvalues(self) -> Tensor:
        """The non-zero eigenvalues of AB, from the small ``BA`` (complex)."""
        return torch.linalg.eig(self.BA.float()).eigenvalues

    def norm(self) -> Float[Tensor, "..."]:
        """The Frobenius norm of AB."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same product with factors ``U sqrt(S)`` and ``sqrt(S) V^T``."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-2, -1))

    def collapse_l(self) -> Float[Tensor, "... mdim rdim"]:
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> Float[Tensor, "... ldim mdim"]:
        return self.U * self.S[..., None, :]

    def unsqueeze(self, dim: int) -> "FactoredMatrix":
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def get_corner(self, k: int = 3) -> Tensor:
        return (self.A[..., :k, :] @ self.B[..., :, :k])[(0,) * (self.ndim - 2)]

    def __getitem__(self, index) -> "FactoredMatrix":
        """Index leading axes (``OV[layer, head]``); indexing the row (and column) axis
        too keeps it, as a length-1 axis, as in TransformerLens."""
        index = index if isinstance(index, tuple) else (index,)
        n_leading = self.ndim - 2
        if len(index) <= n_leading:
            return FactoredMatrix(self.A[index], self.B[index])
        if len(index) > self.ndim:
            raise ValueError(f"{index} indexes more axes than a FactoredMatrix of shape {tuple(self.shape)} has")
        keep = lambda i: slice(i, i + 1 if i != -1 else None) if isinstance(i, int) else i  # noqa: E731
        lead, rest = index[:n_leading], [keep(i) for i in index[n_leading:]]
        rows = rest[0]
        columns = rest[1] if len(rest) > 1 else slice(None)
        return FactoredMatrix(self.A[(*lead, rows)], self.B[(*lead, slice(None), columns)])

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({tuple(self.shape)}), Hidden Dim({self.mdim})"


def composition_scores(left: FactoredMatrix, right: FactoredMatrix) -> Float[Tensor, "..."]:
    """``|L R|_F / (|L|_F |R|_F)`` for every matrix ``L`` of ``left`` and ``R`` of
    ``right`` (leading axes: left's, then right's), from the factors alone: with
    ``L = A_L B_L`` and ``R = A_R B_R``, ``|L R|_F^2 = tr(M^T (A_L^T A_L) M (B_R B_R^T))``
    where ``M = B_L A_R`` is only ``mdim x mdim``, so no ``d_model x d_model`` product is formed."""
    if left.rdim != right.ldim:
        raise ValueError(f"composition needs left's columns to match right's rows, got {left.shape} and {right.shape}")
    lead_l, lead_r = left.shape[:-2], right.shape[:-2]
    A_L, B_L = (t.reshape(-1, *t.shape[-2:]) for t in left.pair)
    A_R, B_R = (t.reshape(-1, *t.shape[-2:]) for t in right.pair)
    gram_l = A_L.transpose(-2, -1) @ A_L  # [l i i]
    gram_r = B_R @ B_R.transpose(-2, -1)  # [r j j]
    M = einops.einsum(B_L, A_R, "l i d, r d j -> l r i j")
    GMH = einops.einsum(gram_l, M, gram_r, "l i k, l r k m, r m j -> l r i j")
    product = (M * GMH).sum((-2, -1)).clamp(min=0).sqrt()
    norm_l = (gram_l * (B_L @ B_L.transpose(-2, -1))).sum((-2, -1)).clamp(min=0).sqrt()
    norm_r = ((A_R.transpose(-2, -1) @ A_R) * gram_r).sum((-2, -1)).clamp(min=0).sqrt()
    return (product / norm_l[:, None] / norm_r[None, :]).reshape(*lead_l, *lead_r)
