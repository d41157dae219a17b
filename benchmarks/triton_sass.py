"""What ptxas makes of the Triton tensor-core kernel, without a GPU: registers, shared memory,
spills, and whether the wgmma pipeline is serialized, per tuner candidate.

    python benchmarks/triton_sass.py --m 256                      # the tuner's M=256 candidates
    python benchmarks/triton_sass.py --m 16 --k 4096 --n 11008
    python benchmarks/triton_sass.py --config 128,64,128,4,3      # one tile: bm,bn,bk,warps,stages
    python benchmarks/triton_sass.py --gluon                      # the trial Gluon kernel

Each configuration is compiled for sm_90a by Triton (as on an H100, with the 16-byte alignment
the runtime sees) and its PTX assembled again by the ptxas Triton ships, whose ``-v`` log says
"wgmma.mma_async instructions are serialized" (warning C7515) when it must wait for every wgmma
before issuing the next. Columns: HGMMA = wgmma instructions in the SASS, waits = full waits on
them ("WARPGROUP.DEPBAR.LE gsb0, 0x0"), loop waits = those inside the K loop (none: the
wgmmas stay in flight while the next tile is dequantized), serialized = that warning, K loop
per weight = the SASS instructions of the K loop per weight a thread handles in one step. A
serialized loop cannot overlap its dequantization with the tensor cores, so such tiles only
compete through occupancy (other blocks on the SM).
``--gluon`` reports the Gluon kernel (``kernels/gluon_mma.py``) per batch tile: its K loop's
SASS instructions per weight, by kind. This is a screen, not a timing: ``benchmarks/kernel_speed.py`` on a GPU has the last word.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ALIGNED_INTS = {"N", "K", "stride_xm", "stride_om", "stride_qn", "stride_sg", "group_size"}


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def inspect(cfg, bits: int = 4, zero: int = 8, k: int = 4096) -> dict:
    """Compile ``cfg`` (a gemm ``KernelConfig``) for sm_90a, for x [M, k]; -> resources and wgmma
    figures."""
    from gptq_lab.kernels.sm90 import compile_for_sm90
    from gptq_lab.kernels.triton_gemm import _gemm_kernel, launch_meta
    meta = launch_meta(cfg, bits, zero, torch.float16, on_cuda=True, k_rows=k)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    args = {a: ("*i32" if a == "qw_ptr" else "*fp16") if a.endswith("_ptr") else "i32"
            for a in _gemm_kernel.arg_names if a not in meta}           # the runtime arguments
    # the 16-byte alignment the runtime sees: every pointer, every size but M and split_k
    aligned = [a for a in args if a.endswith("_ptr") or a in ALIGNED_INTS]
    kernel = compile_for_sm90(_gemm_kernel, args, meta, aligned, **options)
    stats = sass_stats(kernel)
    per_thread = cfg.block_n * cfg.block_k / (32 * cfg.num_warps)       # weights per K step
    return {**{k: stats[k] for k in ("regs", "smem", "spill bytes", "HGMMA", "waits", "loop waits",
                                     "serialized")},
            "per weight": stats["loop"] / per_thread}


def sass_stats(kernel) -> dict:
    """Assemble a compiled kernel's PTX for sm_90a with Triton's ptxas and read its SASS:
    registers, shared memory, spills, wgmma figures, and the instructions of the longest loop
    (the K loop) by opcode."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([_tool("ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    loop: list[str] = []                             # the longest loop: the K loop
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    for address, text in code:                       # a backward branch closes a loop
        target = re.search(r"BRA 0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            loop = max(loop, [t for a, t in code if start <= a <= address], key=len)
    loop_waits = sum("WARPGROUP.DEPBAR.LE gsb0, 0x0" in t for t in loop)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    ops: dict[str, int] = {}
    for text in loop:
        op = re.sub(r"^@!?U?P\w+\s+", "", text.strip()).split(" ")[0].split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    return {"regs": int(regs.group(1)) if regs else -1, "smem": kernel.metadata.shared,
            "spill bytes": int(spills.group(1)) if spills else 0, "HGMMA": sass.count("HGMMA"),
            "waits": sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0"), "loop waits": loop_waits,
            "serialized": "C7515" in log, "loop": len(loop), "loop ops": ops}


def gluon_report() -> str:
    """The trial Gluon kernel (kernels/gluon_mma.py) per batch tile: registers, spills, shared
    memory and its K loop's SASS per weight (each thread handles BN * BK / (32 * NW) weights per
    iteration)."""
    from gptq_lab.kernels import gluon_mma as gm
    lines = [("| rows (BM) | dtype | regs | spill bytes | smem | K loop instructions | per weight | "
              "HMMA | LOP3 | half2 math | IMAD, MOV, PRMT |"), "|---" * 11 + "|"]
    per_thread = gm.BN * gm.BK // (32 * gm.NW)
    for bm in (8, 16, 32, 64):
        for bf16 in (False, True):
            compiled = gm.compile_sm90(bm, bf16)
            dt = "bf16" if bf16 else "fp16"
            r = sass_stats(compiled)
            ops = r["loop ops"]
            half2 = sum(ops.get(o, 0) for o in ("HADD2", "HFMA2", "HMUL2"))
            moves = sum(ops.get(o, 0) for o in ("MOV", "IMAD", "PRMT"))
            lines.append(f"| {bm} | {dt} | {r['regs']} | {r['spill bytes']} | {r['smem']} | {r['loop']} | "
                         f"{r['loop'] / per_thread:.2f} | {ops.get('HMMA', 0)} | {ops.get('LOP3', 0)} | "
                         f"{half2} | {moves} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from gptq_lab.kernels.triton_gemm import KernelConfig
    from gptq_lab.kernels.triton_pack import PreparedGPTQ
    from gptq_lab.kernels.triton_tune import candidates
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=256, help="rows of x (the tuner's bucket of it)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--config", help="bm,bn,bk,warps,stages[,swap,deq] instead of the candidates")
    ap.add_argument("--gluon", action="store_true", help="the trial Gluon kernel instead")
    args = ap.parse_args(argv)
    if args.gluon:
        print(gluon_report())
        return
    if args.config:
        v = [int(s) for s in args.config.split(",")]
        configs = [KernelConfig("gemm", *v[:3], deq_first=bool(v[6]) if len(v) > 6 else True,
                                num_warps=v[3], num_stages=v[4], swap=bool(v[5]) if len(v) > 5 else True)]
    else:
        empty = torch.empty(0)
        p = PreparedGPTQ(empty, empty, empty, None, 4, 128, 8, args.k, args.n)
        configs = list(dict.fromkeys(replace(c, split_k=1)              # (split_k: same code)
                                     for c in candidates(args.m, p, args.k, 132) if c.kind == "gemm"))
    print("| block_m | block_n | block_k | warps | stages | swap | deq_first | regs | smem | "
          "spill bytes | HGMMA | waits | loop waits | serialized | K loop per weight |")
    print("|---" * 15 + "|")
    for c in configs:
        r = inspect(c, k=args.k)
        print(f"| {c.block_m} | {c.block_n} | {c.block_k} | {c.num_warps} | {c.num_stages} | {c.swap} | "
              f"{c.deq_first} | {r['regs']} | {r['smem']} | {r['spill bytes']} | {r['HGMMA']} | "
              f"{r['waits']} | {r['loop waits']} | {'yes' if r['serialized'] else 'no'} | "
              f"{r['per weight']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
