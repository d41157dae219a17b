"""Compile a Triton or Gluon kernel for sm_90 (H100/H200) on a machine without a GPU, as a launch
there would: for the CPU tests that read its PTX and for ``benchmarks/triton_sass.py``.

    compiled = compile_for_sm90(kernel, {"x_ptr": "*fp16", "n": "i32"}, {"BLOCK": 64},
                                aligned=("x_ptr",), num_warps=4)
    compiled.asm["ptx"], compiled.metadata.shared
"""
from __future__ import annotations


def compile_for_sm90(kernel, args: dict[str, str], constexprs: dict, aligned=(), **options):
    """``kernel`` (``triton.jit`` or ``gluon.jit``) compiled for sm_90. ``args``: each runtime
    argument's type ("*fp16", "i32", ...) by name; ``aligned``: those a launch would find
    divisible by 16 (Triton specializes on it: a 16-byte aligned pointer, a row length of 4096);
    ``options``: num_warps, num_stages."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    source = ASTSource
    if kernel.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    attrs = {(list(args).index(a),): [["tt.divisibility", 16]] for a in aligned}
    signature = {**args, **dict.fromkeys(constexprs, "constexpr")}
    return triton.compile(source(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)
