"""Inverse-Hessian factor shared by GPTQ and SparseGPT (Frantar et al. 2022, 2023)."""

from __future__ import annotations

import functools

import torch

from compress.errors import CompressError


def fix_dead_inputs(H: torch.Tensor) -> torch.Tensor:
    """Dead inputs (never active in calibration) get H[i, i] = 1, as in GPTQ, in place; returns
    their bool mask [I] (their weights are to be zeroed)."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return dead


def prepare_hessian(H: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H: [I, I], w: [O, I] -> copies, dead inputs fixed in H and zeroed in w."""
    H, w = H.clone(), w.clone()
    w[:, fix_dead_inputs(H)] = 0
    return H, w


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, max_tries: int = 6,
                     name: str = "", overwrite: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1) with damping `damp * mean(diag H)` added
    to the diagonal. The damping is multiplied by 10 each time a factorization fails. Returns
    (U, damp used); raises CompressError when every try fails (the caller may fall back to
    round-to-nearest).

    Memory (an 8B model's down_proj H is 822 MB in float32): U is returned as the transpose
    view of the lower factor L' of H^-1 (L' L'^T = H^-1, so L'^T is the upper factor: no
    transposed copy, which `cholesky_ex(upper=True)` makes), and the factor of H is freed
    before H^-1 is factorized. H^-1 = L^-T (L^-1 I) is two triangular solves in place in the
    scratch matrix: `cholesky_inverse` computes the same solves, but on CUDA it allocates two
    more [I, I] matrices for them (a column-major copy of L and a result it copies out; 1.53
    GiB of the H200's peak on an 8B layer, evaluate/RESULTS.md, seventh session). With
    overwrite (H is scratch space, its values are lost) at most two [I, I] matrices exist
    here at once, the scratch and one factor, and cuSOLVER's workspace while factorizing."""
    from compress.calib import check_finite

    check_finite(name or "a module", H, "Hessian of the input")
    work = H if overwrite else H.clone()
    diag = work.diagonal()
    base = diag.clone()
    mean_diag = base.mean()
    for _ in range(max_tries):
        diag = work.diagonal()
        diag.copy_(base + damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(work)
        if info == 0:
            work.zero_()                              # H^-1 = L^-T L^-1 I in the scratch
            work.diagonal().fill_(1)
            torch.linalg.solve_triangular(L, work, upper=False, out=work)
            torch.linalg.solve_triangular(L.mT, work, upper=True, out=work)
            del L
            L, info = torch.linalg.cholesky_ex(work)   # H^-1 = L L^T
            if info == 0:
                return L.mT, damp
            # H^-1 is not numerically positive definite: H again, for a try with more
            # damping. The factor of H is gone (memory), so it is the inverse of H^-1; its
            # diagonal is reset from the undamped one above, only the rest is reused.
            del L
            work = torch.linalg.inv(work)
        damp *= 10
    raise CompressError(f"Cholesky factorization of the Hessian of {name or 'a module'} failed "
                        f"up to damping {damp / 10:g}")


def serial_on_cpu(fn):
    """Run fn(w, ...) with one intra-op thread when the weight w is on the CPU. The column loops
    of GPTQ and SparseGPT are thousands of small ops (a few hundred thousand elements each)
    and cholesky_inverse (LAPACK potri) is a short call; with two OpenMP threads on a shared
    2-core machine each waits at every op's barrier for a thread the scheduler has parked:
    a [3072, 576] GPTQ solve took 8.5 s with two threads and 0.5 s with one at load average 5,
    and potri on [576, 576] 1.4 s against 6 ms (evaluate/RESULTS.md, issue 15). Element-wise
    ops do not depend on the thread count; potri's last bits may, and the codes of both
    measured matrices were the same with one and two threads."""
    @functools.wraps(fn)
    def wrapper(w: torch.Tensor, *args, **kwargs):
        if w.device.type != "cpu":
            return fn(w, *args, **kwargs)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(w, *args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper
