"""Compile every kernel variant ahead of time for a GPU target, without a GPU.

    python kernels/compile_check.py [--arch 90]

Triton lowers each @triton.jit kernel through TTIR, TTGIR, LLVM IR and PTX to a cubin for the
target (sm_90 = H100) on the CPU; this catches what the interpreter cannot (type errors in the
compiled dialect, unsupported reshapes, register-layout failures) before GPU time is spent.
Prints one line per variant with its shared memory.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from compress.kernels import _common as C  # noqa: E402
from compress.kernels import (  # noqa: E402
    decode,
    decode_attention,
    kv_cache,
    prefetch,
    rmsnorm,
    rope_gather,
    sparse24,
    tc,
)

ACT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
MATMUL_INTS = ["M", "N", "K", "KW", "G", "GROUP", "stride_xm", "K_PER_SPLIT"]
# split-K in one launch: the workspace of partials and the tile counters (_common.split_total)
SPLIT_PTRS = {"ws_ptr": "*fp32", "cnt_ptr": "*i32"}


# Integer arguments the JIT sees divisible by 16 on Llama-3-8B shapes (it specializes such
# values, and 16-byte aligned pointers): compiled so, the loads vectorize as they will on the GPU.
ALIGNED_INTS = ("N", "K", "KW", "stride_xm", "K_PER_SPLIT")


def compile_one(kernel, types: dict, consts: dict, arch: int, num_warps: int = 4,
                num_stages: int = 2):
    # a constexpr the variant leaves out takes the kernel's default (PDL: off)
    defaults = {p.name: p.default for p in kernel.params
                if p.is_constexpr and p.default is not inspect.Parameter.empty}
    consts = {**{n: v for n, v in defaults.items() if n not in types}, **consts}
    sig = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in consts]
    assert not missing, f"no type or value for {missing}"
    aligned = [i for i, n in enumerate(kernel.arg_names)
               if sig[n].startswith("*") or (n in ALIGNED_INTS and sig[n] == "i32")]
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(kernel.arg_names.index(c),): v for c, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def decode_variants():
    """The decode kernels for every format: M = 1 (_gemv_kernel: Llama-3-8B's K = 4096, g128
    and per-word scales, split-K, an uneven N) and tensor-core tiles (_words_matmul_kernel)."""
    gemv_cfgs = [(C.Config(1, 8, 1024, 2, 1), 4096, True), (C.Config(1, 8, 2048, 4, 1), 4096, True),
                 (C.Config(1, 8, 1024, 2, 2), 4096, True), (C.Config(1, 8, 2048, 4, 2), 4096, True),
                 (C.Config(1, 4, 1024, 2, 1, 2), 14336, True),
                 (C.Config(1, 8, 512, 1, 1, 3), 1000, False),
                 (C.Config(1, 4, 4096, 4, 1), 4096, True)]   # one tile a row set: no loop
    # x of a word column in one load (X8): on for INT4 (decode.X8_LOADS), either for FP4
    # (decode.X8_LOADS_FP4, on since its A/B: the old loop still compiles), never for INT8
    for (fmt, bits, zero, x8), act, (cfg, k, even) in itertools.product(
            [(0, 4, False, True), (0, 4, True, True), (0, 8, False, False), (1, 4, False, False),
             (1, 4, False, True), (2, 4, False, False), (2, 4, False, True)], ACT, gemv_cfgs):
        split, k_per_split = C.split_of(k, cfg)
        per = 32 // bits
        group = {0: 128 if bits == 4 else k, 1: 16, 2: 32}[fmt]
        types = {"x_ptr": ACT[act], "w_ptr": "*i32", "s_ptr": "*bf16" if fmt == 0 else "*u8",
                 "z_ptr": "*i32", "b_ptr": ACT[act], "gs_ptr": "*fp32", "out_ptr": ACT[act],
                 **SPLIT_PTRS, **dict.fromkeys(["N", "stride_xm", "one_bits"], "i32")}
        consts = {"K": k, "KW": -(-k // per), "G": -(-k // group), "GROUP": group,
                  "K_PER_SPLIT": k_per_split, "FMT": fmt, "BITS": bits, "PER": per,
                  "HAS_ZERO": zero, "HAS_BIAS": True, "SPLIT": split > 1,
                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "EVEN_N": even,
                  "PREFETCH": cfg.num_stages > 1, "X8": x8, "GATED": False, "HALF": 0,
                  "PAIR": False}
        yield (f"gemv fmt={fmt} int{bits} zero={zero}{' x8' if x8 else ''} {act} K={k} {cfg}",
               decode._gemv_kernel, types, consts, cfg.num_warps, 1)
        if (x8 or bits == 8) and group % (2 * per) == 0 and k % (2 * per) == 0:   # PAIR_WORDS
            yield (f"gemv pair fmt={fmt} int{bits} zero={zero}{' x8' if x8 else ''} {act} K={k} "
                   f"{cfg}", decode._gemv_kernel, {**types, "w_ptr": "*i64"},
                   {**consts, "PAIR": True}, cfg.num_warps, 1)
            if act == "bf16" and not zero:   # launched with PDL (_common.PDL): griddepcontrol
                yield (f"gemv pair pdl fmt={fmt} int{bits} {act} K={k} {cfg}",
                       decode._gemv_kernel, {**types, "w_ptr": "*i64"},
                       {**consts, "PAIR": True, "PDL": True}, cfg.num_warps, 1)
        if act != "fp32":   # the SiLU-gated epilogue (gate/up)
            yield (f"gemv gated fmt={fmt} int{bits} zero={zero}{' x8' if x8 else ''} {act} K={k} {cfg}",
                   decode._gemv_kernel, types,
                   {**consts, "GATED": True, "HALF": 14336 if even else 1001}, cfg.num_warps, 1)
    for (fmt, bits, zero), act, cfg in itertools.product(
            [(0, 4, False), (0, 4, True), (0, 8, False), (1, 4, False), (2, 4, False)], ACT,
            [C.Config(16, 16, 256), C.Config(64, 64, 128, 8, 3, 2)]):
        types = {"x_ptr": ACT[act], "w_ptr": "*i32", "s_ptr": "*bf16" if fmt == 0 else "*u8",
                 "z_ptr": "*i32", "b_ptr": ACT[act], "gs_ptr": "*fp32", "out_ptr": ACT[act],
                 **SPLIT_PTRS, **dict.fromkeys(MATMUL_INTS, "i32")}
        consts = dict(FMT=fmt, BITS=bits, PER=32 // bits, HAS_ZERO=zero, HAS_BIAS=True,
                      TILE_SCALE=fmt == 0 and cfg.block_k <= 128, IEEE=act == "fp32",
                      SPLIT=cfg.split_k > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, EVEN_K=False, EVEN_N=False,
                      GROUP_SHIFT=-1 if zero else 7)
        yield (f"decode fmt={fmt} int{bits} zero={zero} {act} {cfg}",
               decode._words_matmul_kernel, types, consts, cfg.num_warps, cfg.num_stages)


# (format, bits, zero points): the INT and FP4 families both word kernels serve
WORD_FORMATS = [(0, 4, False), (0, 4, True), (0, 8, False), (1, 4, False), (2, 4, False)]


def tc_configs() -> dict[C.Config, None]:
    """Every tc config the shipped tables and the autotuner's candidates name (ordered, unique)."""
    import json

    sys.path.insert(0, str(Path(__file__).parent))
    from autotune import CANDIDATES

    cfgs = {c: None for bucket in CANDIDATES["tc"].values() for c in bucket}
    for name in ("default.json", "nvidia_h200.json"):
        table = json.loads((C.CONFIG_DIR / name).read_text()).get("tc", {})
        for entry in table.values():
            cfgs.update({C.Config(**c): None for c in entry.values()})
    return cfgs


def tc_variants(all_configs: bool):
    """The tc kernel: every format x activation dtype on a few configs (scales per tile, per
    group, per word; split-K; masked and unmasked), then every config (bf16, INT4 and NVFP4)
    with --all."""
    few = [(C.Config(16, 64, 128, 4, 4, 4), True, 0), (C.Config(64, 64, 64, 4, 3, 1), False, 1),
           (C.Config(128, 128, 64, 8, 3, 1), True, 2),
           (C.Config(16, 64, 128, 4, 4, 4, swap=False), True, 1),
           (C.Config(64, 64, 64, 4, 3, 1, swap=True), False, 0),
           # the packed INT4 decode in K order (Config.k_order): swapped (one async dot) and not
           (C.Config(16, 64, 128, 4, 4, 4, k_order=True), True, 0),
           (C.Config(64, 64, 64, 4, 3, 1, k_order=True), False, 0)]
    cases = [(f, a, c, even, mode) for f in WORD_FORMATS for a in ACT for c, even, mode in few]
    if all_configs:
        cases += [(f, "bf16", c, True, 0 if f[0] == 0 else 1)
                  for f in (WORD_FORMATS[0], WORD_FORMATS[3]) for c in tc_configs()]
    pdl_done = False
    for (fmt, bits, zero), act, cfg, even, mode in cases:
        # INT4 with 16-bit scales of the activations' dtype: the packed decode (tc.packed_int4)
        packed = fmt == 0 and bits == 4 and act != "fp32" and mode == 0
        if cfg.k_order and not packed:   # only the packed decode reads it
            continue
        types = {"x_ptr": ACT[act], "w_ptr": "*i32",
                 "s_ptr": (ACT[act] if packed else "*bf16") if fmt == 0 else "*u8",
                 "z_ptr": "*i32", "b_ptr": ACT[act], "gs_ptr": "*fp32", "out_ptr": ACT[act],
                 **SPLIT_PTRS,
                 **dict.fromkeys(["M", "N", "K", "KW", "G", "GROUP", "GROUP_SHIFT", "stride_xm",
                                  "K_PER_SPLIT", "one_bits"], "i32")}
        consts = dict(FMT=fmt, BITS=bits, PER=32 // bits, HAS_ZERO=zero, HAS_BIAS=True,
                      SCALES=mode, WPG=2, POW2_GROUP=mode != 2, IEEE=act == "fp32",
                      SPLIT=cfg.split_k > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, EVEN_K=even, EVEN_N=even,
                      SWAP=tc.swap(cfg, act == "fp32", mode), PACKED=packed,
                      K_ORDER=cfg.k_order, PLANES=cfg.planes)
        label = (f"tc fmt={fmt} int{bits} zero={zero} {act} {cfg} even={even} scales={mode}"
                 f"{(' packed k-order' if cfg.k_order else ' packed') if packed else ''}")
        yield label, tc._tc_matmul_kernel, types, consts, cfg.num_warps, cfg.num_stages
        if (packed and consts["SWAP"] and act != "fp32" and not cfg.k_order
                and cfg.block_k >= 128 and not cfg.planes):   # Config.planes
            yield (label + " planes", tc._tc_matmul_kernel, types, {**consts, "PLANES": True},
                   cfg.num_warps, cfg.num_stages)
        if packed and act == "bf16" and cfg.split_k > 1 and not pdl_done:   # launched with PDL
            pdl_done = True
            yield (label + " pdl", tc._tc_matmul_kernel, types, {**consts, "PDL": True},
                   cfg.num_warps, cfg.num_stages)


def variants(all_configs: bool = False):
    """(label, kernel, types, constexprs, num_warps, num_stages) for every launched variant."""
    yield from decode_variants()
    yield from tc_variants(all_configs)
    for kind, path in itertools.product(sparse24.VALUE_KINDS, ["gemv", "splitk", "tile"]):
        cfg = C.CONFIGS[path]
        vals = {"16bit": "*bf16", "int": "*i32"}.get(kind, "*u8")
        types = {"x_ptr": "*bf16", "v_ptr": vals, "m_ptr": "*u8",
                 "s_ptr": "*bf16" if kind == "int" else "*u8", "z_ptr": "*i32",
                 "lut_ptr": "*fp32", "gs_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16",
                 **SPLIT_PTRS, **dict.fromkeys(MATMUL_INTS, "i32")}
        del types["KW"]
        consts = dict(KIND=sparse24.VALUE_KINDS[kind], BITS=4, PER=8, HAS_ZERO=kind == "int",
                      HAS_BIAS=False, SPLIT=path != "tile", USE_DOT=path != "gemv", IEEE=False, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        yield (f"2:4-{kind} {path}", sparse24._sparse24_matmul_kernel, types, consts,
               cfg.num_warps, cfg.num_stages)
    for (kind, act, zero, group), (cfg, k, even) in itertools.product(
            (("16bit", "bf16", False, 1), ("16bit", "fp16", False, 1), ("int", "bf16", False, 128),
             ("int", "bf16", True, 128), ("int", "fp16", True, 8)),
            ((C.kernel_config("sparse24", "int", 1, 4096, 4096, "cpu"), 4096, True),
             (C.Config(1, 8, 1024, 2, split_k=2), 14336, True),
             (C.Config(1, 4, 512, 1), 1008, False))):
        ipe = 8 if kind == "16bit" else 16
        split, k_per_split = C.split_of(k, cfg)
        label = (f"2:4-{kind} gemv-T {act} zero={zero} g{group} {cfg.block_n}x{cfg.block_k}"
                 f"/{cfg.num_warps}w split{split} k{k}")
        yield (label, sparse24._sparse24_gemv_kernel,
               {"x_ptr": ACT[act], "v_ptr": "*i64" if kind == "16bit" else "*i32",
                "m_ptr": "*u8" if kind == "16bit" else "*i16", "s_ptr": ACT[act],
                "z_ptr": "*i32", "b_ptr": ACT[act], "out_ptr": ACT[act], **SPLIT_PTRS,
                "N": "i32", "stride_xm": "i32"},
               {"K": k, "G": k // group, "GROUP": group, "E_PER_SPLIT": k_per_split // ipe,
                "KIND": int(kind == "int"), "FP16": act == "fp16", "HAS_ZERO": zero,
                "HAS_BIAS": False, "SPLIT": split > 1, "BLOCK_N": cfg.block_n,
                "BLOCK_E": cfg.block_k // ipe, "EVEN_N": even, "X16": True,
                "X_FP16": act == "fp16", "ASM": True}, cfg.num_warps, 1)
    cfg = C.CONFIGS["dequant_words"]
    dq = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    ints = dict.fromkeys(["N", "K", "KW", "G", "GROUP"], "i32")
    for (fmt, bits, zero), packed in itertools.product(WORD_FORMATS, (False, True)):
        if packed and (fmt, bits) != (0, 4):   # the packed decode is INT4's (tc.packed_int4)
            continue
        yield (f"dequant fmt={fmt} int{bits} zero={zero}{' packed' if packed else ''}",
               tc._tc_dequant_kernel,
               {"w_ptr": "*i32", "s_ptr": "*bf16" if fmt == 0 else "*u8", "z_ptr": "*i32",
                "out_ptr": "*bf16", "gs_ptr": "*fp32", "GROUP_SHIFT": "i32",
                "one_bits": "i32", **ints},
               dict(FMT=fmt, BITS=bits, PER=32 // bits, HAS_ZERO=zero, SCALES=int(fmt != 0),
                    WPG=2, POW2_GROUP=True, PACKED=packed, **dq), cfg.num_warps, 1)
    ints.pop("KW")
    cfg = C.CONFIGS["dequant"]
    yield ("2:4-int dequant", sparse24._sparse24_dequant_kernel,
           {"v_ptr": "*i32", "m_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*i32",
            "lut_ptr": "*fp32", "gs_ptr": "*fp32", "out_ptr": "*bf16", **ints},
           dict(KIND=1, BITS=4, PER=8, HAS_ZERO=True, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k), cfg.num_warps, 1)
    from compress.passes import gptq_kernel   # compression time, not the runtime

    for zero, keep in ((False, False), (True, False), (False, True)):
        yield (f"gptq_block zero={zero} keep={keep}", gptq_kernel._gptq_block_kernel,
               {"w_ptr": "*fp32", "u_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*i8",
                "keep_ptr": "*i1", "codes_ptr": "*i8", "err_ptr": "*fp32",
                **dict.fromkeys(["n_out", "NB", "stride_u0", "stride_u1"], "i32")},
               dict(QMIN=-8, QMAX=7, B=128, BLOCK_O=gptq_kernel.BLOCK_O, HAS_ZERO=zero,
                    HAS_KEEP=keep), 4, 1)
    yield ("add_rmsnorm 4096 bf16", rmsnorm._add_rmsnorm_kernel,
           {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16",
            "h_ptr": "*bf16", "D": "i32", "stride_x": "i32", "stride_r": "i32", "eps": "fp32",
            "DIVISOR": "fp32"},
           dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, CENTERED=False, BLOCK_D=4096), 16, 1)
    yield ("add_rmsnorm 4096 bf16 pdl", rmsnorm._add_rmsnorm_kernel,
           {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16",
            "h_ptr": "*bf16", "D": "i32", "stride_x": "i32", "stride_r": "i32", "eps": "fp32",
            "DIVISOR": "fp32"},
           dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, CENTERED=False, BLOCK_D=4096, PDL=True), 16, 1)
    for pdl in (False, True):   # PDL: launched with programmatic dependent launch
        yield (f"rope_qk hd128 bf16{' pdl' if pdl else ''}", rope_gather._rope_qk_kernel,
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
                "qo_ptr": "*bf16", "ko_ptr": "*bf16",
                **dict.fromkeys(["L", "H", "sq_b", "sq_h", "sq_l", "sk_b", "sk_h", "sk_l", "sc_b",
                                 "sc_l"], "i32")}, dict(HALF=64, BLOCK_H=64, PDL=pdl), 1, 1)
    yield ("rope_gather hd128 bf16", rope_gather._rope_gather_kernel,
           {"ids_ptr": "*i64", "pos_ptr": "*i64", "table_ptr": "*bf16", "cos_ptr": "*fp32",
            "sin_ptr": "*fp32", "out_ptr": "*bf16", "W": "i32", "off0": "i32", "end0": "i32",
            "off1": "i32", "end1": "i32"}, dict(HEAD_DIM=128, BLOCK_W=1024), 4, 1)
    for pdl in (False, True):
        yield (f"static_cache_write hd128 bf16{' pdl' if pdl else ''}",
               kv_cache._static_cache_write_kernel,
               {"k_ptr": "*bf16", "v_ptr": "*bf16", "keys_ptr": "*bf16", "values_ptr": "*bf16",
                "length_ptr": "*i64", "arrivals_ptr": "*i32",
                **dict.fromkeys(["H", "T", "S", "sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t"],
                                "i32")},
               dict(DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, PDL=pdl), 1, 1)
    for split, pdl in ((False, False), (True, True)):
        yield (f"decode_attention r4 hd128 bf16{' split' if split else ''}{' pdl' if pdl else ''}",
               decode_attention._decode_attention_kernel,
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*bf16",
                "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "scale": "fp32",
                **dict.fromkeys(["S", "HKV", "sq_b", "sq_h", "sq_r", "sk_b", "sk_h", "sk_s",
                                 "sv_b", "sv_h", "sv_s", "sm_b", "so_b", "so_h", "so_r",
                                 "S_PER"], "i32")},
               dict(R=4, R_PAD=16, D=128, BLOCK_S=64, HAS_MASK=True, SPLIT=split, IEEE=False,
                    PDL=pdl), 4, 1)
    yield ("prefetch_l2", prefetch._prefetch_l2_kernel, {"table_ptr": "*i64", "plan_ptr": "*i64"},
           dict(CHUNK=prefetch.CHUNK, LANES=prefetch.LANES, PLAN=False), 1, 1)


def ptxas_info(kernel, arch: int) -> str:
    """', N registers, S bytes spilled' from triton's own ptxas on the kernel's PTX."""
    import re
    import subprocess
    import tempfile

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        err = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=False).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    # C7515: ptxas waits on each wgmma before the next instruction (the dots' async lost)
    return (f", {regs.group(1) if regs else '?'} registers, "
            f"{spill.group(1) if spill else '?'} bytes spilled"
            f"{', wgmma serialized (C7515)' if 'C7515' in err else ''}")


def loop_sass(kernel) -> str:
    """', L SASS in the main loop': the longest backward branch's body in the cubin
    (nvdisasm from triton's own bin directory), what a thread issues per K-tile."""
    import re
    import subprocess
    import tempfile

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        lines = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True,
                               check=False).stdout.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if line.startswith(".L_x_")}
    loops = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"@!?P\d+ BRA `\((\.L_x_\d+)\)", line))
             and labels.get(m.group(1), i) < i]
    if not loops:
        return ", no loop"
    _, start, end = max(loops)
    body = [line for line in lines[start:end + 1] if re.match(r"\s+/\*[0-9a-f]{4}\*/\s", line)]
    # shared-memory traffic and barriers in the loop: Triton's layout conversions (the M = 1
    # loop converts its x operand through shared memory once per code slot); global loads: the
    # M = 1 kernel is limited by L1 load instructions (H200 ncu, kernels/NOTES.md)
    ops = {op: sum(1 for line in body if re.search(rf"\s{op}[.\s]", line))
           for op in ("LDG", "STS", "LDS", "BAR")}
    # wgmma left in flight across the loop's back edge (Triton's async dot: the next tile's
    # decode overlaps it): the largest WARPGROUP.DEPBAR count in the loop, 0 = waits on each
    waits = [int(m.group(1), 16) for line in body
             if (m := re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", line))]
    async_ = f", wgmma in flight {max(waits)}" if waits else ""
    return (f", {len(body)} SASS in the main loop (LDG {ops['LDG']}, STS {ops['STS']}, "
            f"LDS {ops['LDS']}, BAR {ops['BAR']}){async_}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all", action="store_true",
                        help="also every tc config of the tables and autotune candidates")
    parser.add_argument("--spills", action="store_true",
                        help="run ptxas -v on each variant: registers and local-memory spills")
    parser.add_argument("--sass", action="store_true",
                        help="count the SASS instructions of each variant's main loop")
    parser.add_argument("--only", default="", help="compile only variants whose label has this")
    args = parser.parse_args()
    failures = 0
    for label, kernel, types, consts, warps, stages in variants(args.all):
        if args.only not in label:
            continue
        try:
            k = compile_one(kernel, types, consts, args.arch, warps, stages)
            extra = ptxas_info(k, args.arch) if args.spills else ""
            extra += loop_sass(k) if args.sass else ""
            print(f"ok    {label:32} shared memory {k.metadata.shared} B{extra}")
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL  {label:32} {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    print(f"triton {triton.__version__}, sm_{args.arch}: {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
