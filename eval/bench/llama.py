"""Injection-time benchmark for LLaMA-7B-shaped weights (paper Table VIII: q_proj and v_proj at r = 1024).

LLaMA2-7B has 32 layers x (q_proj, v_proj) = 64 matrices of 4096 x 4096. We time the top-r LDU that add_loldu runs
(loldu_sd.top_r_ldu with LoLDUConfig's defaults) against a full torch.linalg.lu of the same matrices, in one run.
The matrices are random (no model download) and made one at a time from a seeded generator, so memory stays at a
few copies of one matrix (64 MB each in fp32) instead of 4 GB.

    python -m eval.bench.llama                     # 64 matrices 4096^2, r=1024 (minutes on a laptop CPU)
    python -m eval.bench.llama --n-matrices 4      # time 4 and extrapolate to 64 (labelled as such)
    python -m eval.bench.llama --smoke             # 4 matrices 256^2, r=64: seconds
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from loldu_sd import LoLDUConfig, top_r_ldu

LLAMA_7B_MATRICES = 64  # 32 decoder layers x (q_proj, v_proj)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def llama_injection_benchmark(n_matrices: int = LLAMA_7B_MATRICES, size: int = 4096, rank: int = 1024,
                              repeats: int = 1, full_lu: bool = True, device: str = "cpu", seed: int = 0,
                              smoke: bool = False) -> dict:
    """Seconds to factorise n random size x size matrices at `rank` (top-r LDU) vs full LU; a JSON-able dict."""
    if smoke:
        n_matrices, size, rank = 4, 256, 64
    cfg = LoLDUConfig(rank=rank)  # the precisions add_loldu uses: fp32 factors of an fp16-rounded weight
    gen = torch.Generator(device=device).manual_seed(seed)
    ldu_times, lu_times, err = [], [], None
    # warm-up on a small matrix: the first LAPACK/cuSOLVER call pays one-off set-up costs
    warm = torch.randn(128, 128, generator=gen, device=device)
    top_r_ldu(warm, 32, cfg.factor_dtype)
    torch.linalg.lu(warm)
    for i in range(n_matrices):
        w = torch.randn(size, size, generator=gen, device=device) * size ** -0.5  # made on the fly, then dropped
        for _ in range(repeats):  # _timed calls each lambda at once, before `del w` (B023/F821 do not apply)
            ldu_times.append(_timed(
                lambda: top_r_ldu(w, rank, cfg.factor_dtype), device))  # noqa: B023, F821
            if full_lu:
                lu_times.append(_timed(lambda: torch.linalg.lu(w), device))  # noqa: B023, F821
        if i == 0 and full_lu:  # correctness on the first matrix: top-r pivots equal the full LU's leading pivots
            f = top_r_ldu(w, rank, cfg.factor_dtype)
            _, _, U = torch.linalg.lu(w)
            err = float((f.z0 - U.diagonal()[:rank]).abs().max())
        del w
    per_ldu = sum(ldu_times) / len(ldu_times)
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "n_matrices": n_matrices,
              "size": size, "rank": rank, "repeats": repeats,
              "top_r_ldu_s_per_matrix": per_ldu, "top_r_ldu_total_s": per_ldu * n_matrices,
              "max_pivot_diff_vs_full_lu": err}
    if full_lu:
        per_lu = sum(lu_times) / len(lu_times)
        result.update(full_lu_s_per_matrix=per_lu, full_lu_total_s=per_lu * n_matrices, speedup=per_lu / per_ldu)
    if n_matrices != LLAMA_7B_MATRICES and not smoke:  # say plainly what is measured and what is extrapolated
        result["extrapolated_to_64_matrices"] = {"top_r_ldu_s": per_ldu * LLAMA_7B_MATRICES,
                                                 **({"full_lu_s": per_lu * LLAMA_7B_MATRICES} if full_lu else {})}
    return result


def main(argv: list[str] | None = None) -> dict:
    """Command line: python -m eval.bench.llama [--n-matrices N] [--smoke] [--device cuda]."""
    p = argparse.ArgumentParser(prog="python -m eval.bench.llama", description=__doc__.split("\n")[0])
    p.add_argument("--n-matrices", type=int, default=LLAMA_7B_MATRICES)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-full-lu", action="store_true", help="time the top-r LDU only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="4 matrices of 256x256 at r=64")
    a = p.parse_args(argv)
    result = llama_injection_benchmark(a.n_matrices, a.size, a.rank, a.repeats, not a.no_full_lu, a.device,
                                       smoke=a.smoke)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
