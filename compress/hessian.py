"""Inverse-Hessian factor shared by GPTQ and SparseGPT (Frantar et al. 2022, 2023)."""

from __future__ import annotations

import torch

from compress.errors import BadInputData, CompressError


def prepare_hessian(H: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (never active in calibration) get H[i, i] = 1 and zero weight, as in GPTQ.
    H: [I, I], w: [O, I]. Returns copies."""
    H, w = H.clone(), w.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    w[:, dead] = 0
    return H, w


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, max_tries: int = 6,
                     name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 with damping `damp * mean(diag H)` added to the diagonal.
    The damping is multiplied by 10 each time the factorization fails. Returns (U, damp used);
    raises CompressError when every try fails (the caller may fall back to round-to-nearest)."""
    if not torch.isfinite(H).all():
        raise BadInputData(f"Hessian of {name or 'a module'} contains NaN or Inf: the "
                            "calibration activations are not finite; nothing was written")
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, damp
        damp *= 10
    raise CompressError(f"Cholesky factorization of the Hessian of {name or 'a module'} failed "
                        f"up to damping {damp / 10:g}")
