"""The expression printers: printed PyTorch and Triton text, executed, equals the sympy
expression evaluated numerically; the stable functions' derivatives equal sympy.diff of
their definitions."""
import math
import os

import numpy as np
import pytest
import sympy
import torch

from recdsl.codegen import torch_support
from recdsl.codegen.printers import TorchPrinter, TritonPrinter
from recdsl.ir import symbolic

x, y = symbolic.symbol("x"), symbolic.symbol("y")
S = symbolic
EXPRESSIONS = [
    sympy.exp(x) * y - sympy.log(sympy.Abs(y) + 1),
    S.sigmoid(x) + S.logsigmoid(y) * S.softplus(x - y),
    S.silu(x) / (1 + S.relu(y)),
    sympy.sqrt(sympy.Abs(x) + 0.5) + S.rsqrt(y * y + 1e-3),
    sympy.tanh(x) * sympy.Max(x, y) - sympy.Min(x, 2 * y),
    x ** 2 + y ** 3 - x ** -2 + (sympy.Abs(x) + 1) ** 0.75,
    sympy.diff(sympy.Max(x, y) * S.softplus(x), x),
    sympy.diff(sympy.Abs(x) * S.sigmoid(y), x),
    S.softplus(x * 30) + S.logsigmoid(-30 * y),  # large arguments: stable forms, no overflow
]


def _reference(expr, xs, ys):
    f = sympy.lambdify((x, y), expr.replace(lambda e: isinstance(e, S._Stable),
                                            lambda e: type(e).definition(e.args[0])),
                       modules=["mpmath"])
    return np.array([float(f(a, b)) for a, b in zip(xs, ys)])


def _points(n=64):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, generator=g, dtype=torch.float64) * 2
    ys = torch.randn(n, generator=g, dtype=torch.float64) * 2
    xs[0], ys[0] = 0.3, 0.3  # a tie for max/min
    return xs, ys


@pytest.mark.parametrize("stable", S.STABLE, ids=lambda f: f.__name__)
def test_stable_derivative_equals_sympy_diff(stable):
    derivative = stable(x).diff(x)
    truth = sympy.diff(stable.definition(x), x)
    values = (0.05, 0.7, 2.9, 40.0) if stable is S.rsqrt else (-3.5, -0.2, 0.7, 2.9)
    for value in values:
        a = derivative.replace(lambda e: isinstance(e, S._Stable), lambda e: type(e).definition(e.args[0]))
        assert float(a.subs(x, value).evalf(30)) == pytest.approx(float(truth.subs(x, value).evalf(30)), rel=1e-12)


@pytest.mark.parametrize("expr", EXPRESSIONS, ids=range(len(EXPRESSIONS)))
def test_torch_printer_matches_sympy(expr):
    xs, ys = _points()
    text = TorchPrinter().doprint(expr)
    value = eval(text, {"torch": torch, "_rt": torch_support, "x": xs, "y": ys})  # noqa: S307
    expected = _reference(expr, xs.tolist(), ys.tolist())
    np.testing.assert_allclose(np.broadcast_to(value.numpy(), expected.shape), expected, rtol=1e-12, atol=1e-12)


def test_triton_printer_matches_sympy_in_interpreter(tmp_path):
    """Each expression goes into one small elementwise kernel, run under TRITON_INTERPRET=1
    in a subprocess (the interpreter must be switched on before triton.jit runs)."""
    import subprocess
    import sys
    lines = ["import torch, triton", "import triton.language as tl", ""]
    for i, expr in enumerate(EXPRESSIONS):
        lines += [
            "@triton.jit",
            f"def k{i}(X, Y, O, n, BLOCK: tl.constexpr):",
            "    offs = tl.arange(0, BLOCK)",
            "    m = offs < n",
            "    x = tl.load(X + offs, mask=m, other=1.0)",
            "    y = tl.load(Y + offs, mask=m, other=1.0)",
            f"    tl.store(O + offs, {TritonPrinter().doprint(expr)}, mask=m)",
            "",
        ]
    xs, ys = _points()
    lines += [
        f"xs = torch.tensor({[float(v) for v in xs.float()]}, dtype=torch.float32)",
        f"ys = torch.tensor({[float(v) for v in ys.float()]}, dtype=torch.float32)",
        "out = []",
        f"for k in [{', '.join(f'k{i}' for i in range(len(EXPRESSIONS)))}]:",
        "    o = torch.empty_like(xs)",
        "    k[(1,)](xs, ys, o, xs.numel(), BLOCK=64)",
        "    out.append(o.tolist())",
        "print(repr(out))",
    ]
    script = tmp_path / "kernels.py"
    script.write_text("\n".join(lines))
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="0")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - a list of floats we printed
    xs32, ys32 = xs.float().double().tolist(), ys.float().double().tolist()
    for expr, got in zip(EXPRESSIONS, results):
        expected = _reference(expr, xs32, ys32)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=str(expr))
