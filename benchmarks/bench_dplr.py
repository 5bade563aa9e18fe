"""CPU benchmark of the DPLR family's chunkwise path (backend="torch-chunk",
recdsl.runtime.torch_chunk_dplr).

KDA and RWKV-7 (the rules of tests/runtime/test_torch_chunk_dplr.py) at B=2, H=4, K=V=64,
fp32, gates ``logsigmoid(randn)`` (fla's tests' gates), one torch thread by default: the naive
loop (timed at --loop-t tokens and extrapolated linearly, marked ~), torch-chunk at a few
chunk sizes, and, when fla-core is installed (``pip install --no-deps fla-core einops``), fla's
pure-PyTorch ``naive_chunk_kda`` (64-token chunks, the pairwise [L, L, K] form; q and k
L2-normalised in the timed call, as the rule does). Forward (no_grad) and forward+backward
(gradients of every input), the median wall time of a few interleaved runs
(benchmarks/bench_diagonal.py's ``timed``).

    python3 benchmarks/bench_dplr.py                  # T = 4096
    python3 benchmarks/bench_dplr.py --T 1024 --reps 1 --chunks 16 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import recdsl  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402
from recdsl.runtime import torch_chunk_dplr  # noqa: E402

KDA = """rule kda
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K]
input beta
let kn = l2norm(k)
S = diag(exp(gk)) @ S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

RWKV7 = """rule rwkv7
dims V, K
state S[V, K]
input r[K], k[K], v[V], gk[K], kk[K], a[K]
param u[K]
let kn = l2norm(kk)
S = S @ diag(exp(gk))
S = S - outer(S @ kn, kn * a)
S = S + outer(v, k)
output o = S @ r + dot(r, k * u) * v
"""

# fla's generalized DPLR in one statement, as its naive dplr_recurrence defines it:
# S_t = (Diag(exp(gk)) + b aᵀ) S_{t-1} + k vᵀ, o = (q / sqrt(K)) @ S
DPLR = """rule dplr
dims K, V
state S[K, V]
input q[K], k[K], v[V], a[K], b[K], gk[K]
S = diag(exp(gk)) @ S + outer(b, a @ S) + outer(k, v)
output o = K ** -0.5 * (q @ S)
"""

B, H, K, V = 2, 4, 64, 64


def inputs(name, T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen)
    x = {"gk": F.logsigmoid(rn(B, T, H, K)), "v": rn(B, T, H, V)}
    if name == "kda":
        x.update(q=rn(B, T, H, K), k=rn(B, T, H, K), beta=torch.sigmoid(rn(B, T, H)))
    elif name == "dplr":  # RWKV-7's a = -kappa, b = kappa * a_icl: eigenvalues in [-1, 1]
        kappa = F.normalize(rn(B, T, H, K), dim=-1)
        x.update(q=rn(B, T, H, K), k=rn(B, T, H, K) * 0.1, a=-kappa,
                 b=kappa * torch.sigmoid(rn(B, T, H, K)))
    else:
        x.update(r=rn(B, T, H, K), k=rn(B, T, H, K), kk=rn(B, T, H, K),
                 a=torch.sigmoid(rn(B, T, H, K)), u=rn(H, K))
    return x


def chunked(rule, chunk):
    def fn(x):
        old = torch_chunk_dplr.CHUNK_SIZE
        torch_chunk_dplr.CHUNK_SIZE = chunk
        try:
            return rule(**x, backend="torch-chunk")[0]
        finally:
            torch_chunk_dplr.CHUNK_SIZE = old
    return fn


def fla_kda(naive):
    def fn(x):
        q = F.normalize(x["q"], dim=-1, eps=1e-6)
        k = F.normalize(x["k"], dim=-1, eps=1e-6)
        return naive.naive_chunk_kda(q, k, x["v"], x["gk"], x["beta"])[0]
    return fn


def fla_dplr(naive, chunk):
    def fn(x):  # its layout [B, H, T, ...]; alpha = a, beta = b; T a multiple of the chunk
        t = lambda z: z.transpose(1, 2)
        return naive.dplr_chunkwise(t(x["q"]), t(x["k"]), t(x["v"]), t(x["a"]), t(x["b"]),
                                    t(x["gk"]), chunk_size=chunk)[0].transpose(1, 2)
    return fn


def load_fla_dplr():
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.generalized_delta_rule.dplr import naive
        return naive
    except Exception as err:
        print(f"# fla's dplr_chunkwise not available ({err!r}): skipped")
        return None


def load_fla_kda():
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.kda import naive
        return naive
    except Exception as err:  # not installed, or needs a GPU
        print(f"# fla's naive_chunk_kda not available ({err!r}): skipped")
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--loop-t", type=int, default=512, help="tokens for the naive loop")
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--rules", nargs="+", default=["kda", "rwkv7", "dplr"],
                   choices=["kda", "rwkv7", "dplr"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-loop", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    naive = load_fla_kda()
    dplr_naive = load_fla_dplr() if "dplr" in args.rules else None
    print(f"# B={B} H={H} K=V={K}, fp32, T={args.T}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; default chunk {torch_chunk_dplr.CHUNK_SIZE}")
    print(f"{'rule':7} {'pass':8} {'method':28} {'seconds':>9} {'vs loop':>8} {'vs fla':>7}")
    for name in args.rules:
        rule = recdsl.compile({"kda": KDA, "rwkv7": RWKV7, "dplr": DPLR}[name])
        x = inputs(name, args.T)
        for backward in (False, True):
            fns = {f"torch-chunk C={c}": run_once(chunked(rule, c), x, backward)
                   for c in args.chunks}
            if name == "kda" and naive is not None:
                fns["fla naive_chunk_kda"] = run_once(fla_kda(naive), x, backward)
            if name == "dplr" and dplr_naive is not None:
                fns["fla dplr_chunkwise"] = run_once(fla_dplr(dplr_naive, 16), x, backward)
            times = {k: v[0] for k, v in timed(fns, args.reps, budget=120).items()}
            loop = None
            if not args.no_loop:
                short = inputs(name, args.loop_t)
                loop = timed({"naive": run_once(lambda z: rule(**z, backend="naive")[0],
                                                short, backward)}, 1,
                             budget=60)["naive"][0] * args.T / args.loop_t
            fla = times.get("fla naive_chunk_kda") or times.get("fla dplr_chunkwise")
            mode = "fwd+bwd" if backward else "fwd"
            if loop is not None:
                print(f"{name:7} {mode:8} {'naive loop (~)':28} {loop:9.3f}")
            for method, t in times.items():
                vs_loop = f"{loop / t:7.2f}x" if loop else ""
                vs_fla = f"{fla / t:6.2f}x" if fla else ""
                print(f"{name:7} {mode:8} {method:28} {t:9.3f} {vs_loop:>8} {vs_fla:>7}",
                      flush=True)


if __name__ == "__main__":
    main()
