"""Fused CPU kernels (``cpu_kernels.cc``) as MindSpore AOT custom operators, built on first use.

MindSpore's CPU kernels lose most of the QAT step's time to element-wise chains and a scalar ``Erf``
(measured on a 4096 x 1536 MiniLM feed-forward activation, one thread: GELU forward 162 vs 15 ms,
its backward 39 vs 12 ms, quantize 19 vs 8 ms, max|x| 16 vs 3 ms; max|W| of the 30522 x 384 word
embedding 25 vs 3.5 ms), and to broadcasting element-wise ops, each several times slower than the same
op on equal shapes: LayerNorm's backward, the attention mask and scale. Those become fused row kernels
(LayerNorm forward and backward, masked softmax and its backward, the integer layer's dequantization).
The layers' matrix products go to oneDNN's ``dnnl_sgemm`` from the ``libdnnl`` MindSpore ships
(137-156 GFLOP/s on one CPU; MindSpore's CPU MatMul about 100 per CPU, on both CPUs of a 2-CPU machine
even with a kernel pool of one thread). Every kernel splits its work over :func:`threads` threads.
:func:`load` compiles the C++ file once per machine with the system's ``g++``
(``-O3 -march=native``) into a cache folder and wraps its functions in ``mindspore.ops.Custom``;
:mod:`.quantization` and :mod:`.bert` then use them on the CPU. ``max_abs`` and ``quantize`` give the
bits of the MindSpore ops they replace (and of :mod:`q8core.reference`); the GELU kernels agree with
MindSpore's ``Erf``/``Exp`` within a few float32 ulps.

Where no compiler is found, or it fails, the backend keeps MindSpore's own ops and says so once.
``Q8_MS_CPU_KERNELS=0`` turns the kernels off; ``Q8_KERNEL_CACHE`` moves the cache (default
``~/.cache/q8bert``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from q8core.errors import Q8Error, first_line

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC",
         "-pthread"]
ENABLE_ENV = "Q8_MS_CPU_KERNELS"
CACHE_ENV = "Q8_KERNEL_CACHE"


class Kernels:
    """The compiled kernels as ``mindspore.ops.Custom`` primitives (see cpu_kernels.cc for each formula)."""

    def __init__(self, library: Path) -> None:
        from mindspore import ops
        from mindspore.ops import CustomRegOp, DataType

        def custom(name, inputs):
            # out_shape None: the library's <name>InferShape, which dynamic-shape graphs need. MindSpore
            # 2.10 then also needs the registration (an unregistered one fails: "The pointer[value] is null")
            reg = CustomRegOp(name)
            for index, input_name in enumerate(inputs):
                reg = reg.input(index, input_name)
            info = reg.output(0, "y").dtype_format(*[DataType.F32_Default] * (len(inputs) + 1)).target("CPU")
            return ops.Custom(f"{library}:{name}", out_shape=None, out_dtype=lambda x, *rest: x, func_type="aot",
                              reg_info=info.get_op_info())

        #: x -> x * Phi(x)
        self.gelu = custom("Q8Gelu", ["x"])
        #: (x, dy) -> dy * GELU'(x)
        self.gelu_grad = custom("Q8GeluGrad", ["x", "dy"])
        #: x -> max|x|, shape ()
        self.max_abs = custom("Q8MaxAbs", ["x"])
        #: (x, scale, qmax) -> clamp(rint(x * scale), -qmax, qmax)
        self.quantize = custom("Q8Quantize", ["x", "scale", "qmax"])
        #: x -> sum(x * x), shape ()
        self.sum_squares = custom("Q8SumSquares", ["x"])
        #: (param, m, v, grad, clip, hyper) -> 0, updating param, m, v in place (see :mod:`.optim`)
        self.adamw = custom("Q8AdamW", ["param", "m", "v", "grad", "clip", "hyper"])
        #: (x, weight, bias, eps) -> LayerNorm over the last axis
        self.layer_norm = custom("Q8LayerNorm", ["x", "weight", "bias", "eps"])
        #: (x, weight, dy, eps) -> LayerNorm's input gradient
        self.layer_norm_grad = custom("Q8LayerNormGrad", ["x", "weight", "dy", "eps"])
        #: (x, dy, eps) -> [weight gradient, bias gradient], shape (2, width)
        self.layer_norm_param_grad = custom("Q8LayerNormParamGrad", ["x", "dy", "eps"])
        #: (scores, additive, scale) -> softmax(scores * scale + additive) over the last axis
        self.masked_softmax = custom("Q8MaskedSoftmax", ["scores", "additive", "scale"])
        #: (probs, dprobs, scale) -> the gradient of masked_softmax's scores
        self.softmax_grad = custom("Q8SoftmaxGrad", ["probs", "dprobs", "scale"])
        #: (acc, bias_q, s_b) -> (acc + bias_q) / s_b
        self.dequantize = custom("Q8Dequantize", ["acc", "bias", "scale"])
        # the same library object MindSpore opens: the thread count set here is the kernels'
        handle = ctypes.CDLL(str(library))
        handle.Q8SetThreads(ctypes.c_int(threads()))
        # oneDNN's GEMM on 2-D float32 (None where the library was built without it: see build)
        has_gemm = hasattr(handle, "Q8MatMulNT")
        #: (a, b) -> a . b^T
        self.matmul_nt = custom("Q8MatMulNT", ["a", "b"]) if has_gemm else None
        #: (a, b) -> a . b
        self.matmul_nn = custom("Q8MatMulNN", ["a", "b"]) if has_gemm else None
        #: (a, b) -> a^T . b
        self.matmul_tn = custom("Q8MatMulTN", ["a", "b"]) if has_gemm else None


#: The loaded kernels, or ``None`` (not loaded, not on a CPU, turned off, or no compiler): read by the
#: cells when a graph is compiled, so set it (:func:`load`) before building a model.
ACTIVE: Kernels | None = None
_tried = False


def enabled() -> bool:
    value = os.environ.get(ENABLE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise Q8Error(f"{ENABLE_ENV}={value!r}: expected 0 or 1")
    return value not in ("0", "false", "no", "off")


def load() -> Kernels | None:
    """Build (once per machine) and load the kernels; ``None``, with one note, where that fails."""
    global ACTIVE, _tried
    if _tried:
        return ACTIVE
    _tried = True
    if not enabled():
        return None
    try:
        ACTIVE = Kernels(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"q8: note: MindSpore CPU kernels not built ({first_line(exc)}); using MindSpore's own ops (slower)",
              file=sys.stderr)
    return ACTIVE


@contextmanager
def standard_ops():
    """MindSpore's own ops for the graphs compiled inside the block: an exported MINDIR must run where
    this machine's library does not exist (MindSpore Lite, Ascend, another host)."""
    global ACTIVE
    saved, ACTIVE = ACTIVE, None
    try:
        yield
    finally:
        ACTIVE = saved


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "q8bert")


def threads() -> int:
    """Threads of the kernels (each splits its rows or elements, the same bits on any count):
    ``Q8_MS_THREADS`` where set, else every CPU, as MindSpore's own MatMul (it ran on both CPUs of a
    2-CPU machine with a kernel pool of one thread). Below 32768 elements a call stays on one thread."""
    from .device import THREADS_ENV, kernel_threads

    return kernel_threads() if os.environ.get(THREADS_ENV, "").strip() else max(1, os.cpu_count() or 1)


def gemm_flags() -> list[str]:
    """Compiler arguments that add the matrix-product kernels: MindSpore's own oneDNN (``lib/libdnnl.so.*``,
    whose ``dnnl_sgemm`` does more per CPU than MindSpore's CPU MatMul), linked with its folder as the
    run path; none where this MindSpore ships no oneDNN (the layers then keep MindSpore's MatMul)."""
    import mindspore

    found = sorted(Path(mindspore.__file__).parent.joinpath("lib").glob("libdnnl.so*"))
    if not found:
        return []
    return ["-DQ8_DNNL", str(found[0]), f"-Wl,-rpath,{found[0].parent}"]


def _machine_key(compiler: str, extra: list[str]) -> str:
    """What the library depends on: source, flags, compiler, and this CPU (``-march=native``)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS + extra).encode())
    digest.update(subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout.encode())
    digest.update(platform.machine().encode())
    try:
        with open("/proc/cpuinfo") as info:
            digest.update(next((line for line in info if line.startswith(("flags", "Features"))), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def build() -> Path:
    """The compiled library's path, compiling it into the cache folder unless it is there already.

    The compiler writes a temporary file beside the target, which is then renamed: concurrent processes
    (data-parallel ranks) never see half a library."""
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise OSError("no C++ compiler: g++ not found and CXX unset")
    folder = cache_folder()
    extra = gemm_flags()
    target = folder / f"q8_cpu_kernels-{_machine_key(compiler, extra)}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", temporary, str(SOURCE), *extra], capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{compiler} failed: {lines[0] if lines else done.returncode}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target
