#!/usr/bin/env python3
"""transform.py: rewrite CUDA sources for the CPU emulation (cuda_emu.h).

    python3 transform.py OUTDIR FILE.cu...   writes OUTDIR/FILE.cpp for each

Each launch `kernel<<<grid, block, smem, stream>>>(args)` becomes
`emu::launch_cfg(grid, block, smem, stream).run("kernel", [&]{ kernel(args); })`, which
checks the kernel's own shared memory limit (set by cudaFuncSetAttribute, which names the
kernel the same way) and calls it once per emulated thread; `extern __shared__` arrays point at the launch's
dynamic shared memory. Nothing else changes.
"""

import os
import re
import sys


def callee_start(src, j):
    """Start of the expression before `<<<` at j: a name with its template arguments
    or subscripts (`kernels[M - 1]`, `attn_decode_kernel<KV, VEC, NV>`)."""
    k, depth = j - 1, 0
    while k >= 0:
        c = src[k]
        if c in '>]':
            depth += 1
        elif c in '<[':
            depth -= 1
        elif depth == 0 and not (c.isalnum() or c in '_:'):
            break
        k -= 1
    return k + 1


def closing_paren(src, p):
    """Index of the parenthesis that closes the one at p."""
    depth = 0
    for q in range(p, len(src)):
        depth += {'(': 1, ')': -1}.get(src[q], 0)
        if depth == 0:
            return q
    raise ValueError("unbalanced parentheses after a launch")


def fresh_shared(m):
    """`__shared__ T a[N], b;` becomes static arrays that each block finds poisoned
    (emu::fresh_shared), as a GPU's shared memory holds nothing from another block."""
    parts, depth, start = [], 0, 0
    decls = m.group(2)
    for i, c in enumerate(decls):
        depth += {'[': 1, ']': -1, '(': 1, ')': -1}.get(c, 0)
        if c == ',' and depth == 0:
            parts.append(decls[start:i])
            start = i + 1
    parts.append(decls[start:])
    names = [re.match(r"\s*(\w+)", p).group(1) for p in parts]
    return "static %s %s; %s" % (m.group(1), decls,
                                   " ".join("emu::fresh_shared(&%s, sizeof(%s));" % (n, n) for n in names))


def transform(src):
    src = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1 *\2 = (\1 *) emu::dynamic_smem;", src)
    # the kernel's name goes with its shared memory limit (cuda_emu.h)
    src = src.replace("cudaFuncSetAttribute(", "EMU_FUNC_SET_ATTRIBUTE(")
    src = re.sub(r"__shared__\s+([\w:<>]+)\s+([^;]+);", fresh_shared, src)
    out, i = [], 0
    while (j := src.find('<<<', i)) >= 0:
        k = callee_start(src, j)
        e = src.index('>>>', j)
        q = closing_paren(src, e + 3)
        out.append(src[i:k])
        out.append('emu::launch_cfg(%s).run("%s", [&]{ %s(%s); })'
                   % (src[j + 3:e], src[k:j], src[k:j], src[e + 4:q]))
        i = q + 1
    out.append(src[i:])
    return ''.join(out)


for path in sys.argv[2:]:
    name = os.path.basename(path).replace('.cu', '.cpp')
    with open(os.path.join(sys.argv[1], name), 'w') as f:
        f.write(transform(open(path).read()))
