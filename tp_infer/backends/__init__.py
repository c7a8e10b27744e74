"""Hardware paths behind one interface. The model (tp_infer.model) says DeepSeek's math; what depends on the
hardware goes through a Backend that the runner picks once from the device, the compute dtype and the flags:
products with weights that may be FP8, norms and rotary embeddings, the router and the routed experts, and attention
over the paged pool with the store of each step's new entries.

- `torch` (tp_infer.backends.reference): the reference implementation, plain PyTorch on any device, with no host
  synchronisation inside a forward, so that a decode step compiles whole (torch.compile(fullgraph=True)) and can be
  captured as a CUDA graph. On CUDA with block-FP8 weights its products use torch's block-scaled scaled_mm where the
  GPU and torch have it.
- `cpu` (tp_infer.backends.cpu): the compiled CPU kernels (kernels.c) and oneDNN's products for fp32 on the CPU,
  handing whatever they do not cover to the reference.
- `cuda` (tp_infer.backends.cuda): Triton kernels on the GPU (paged MLA decode over the pool in place, block-FP8
  products where torch's scaled_mm does not serve), the reference for the rest; needs Triton (CUDA builds of torch
  bring it), and runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), as the tests do.

A backend's method either handles its operands or hands them to the reference's (its base class); that choice is made
from shapes, dtypes and devices before any argument is built."""

from tp_infer.backends.reference import Backend, reference

BACKENDS = ("auto", "torch", "cpu", "cuda")


def pick(name: str, device_type: str, dtype_name: str) -> Backend:
    """The backend called `name`, or for "auto" the fastest that covers this device and compute dtype: `cpu` for
    fp32 on the CPU (the compiled kernels take fp32 only), `cuda` on CUDA where Triton imports, else `torch`."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
    from tp_infer.backends import cuda

    if name == "auto":
        if device_type == "cuda" and cuda.available():
            name = "cuda"
        else:
            name = "cpu" if device_type == "cpu" and dtype_name == "fp32" else "torch"
    if name == "cpu":
        from tp_infer.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        if device_type != "cuda" and not cuda.interpreting():
            raise ValueError(f"backend 'cuda' runs on CUDA, not on {device_type} (or under TRITON_INTERPRET=1)")
        if not cuda.available():
            raise ValueError("backend 'cuda' needs Triton (pip install triton): choose torch or auto")
        return cuda.CudaBackend()
    return reference()


__all__ = ["BACKENDS", "Backend", "pick", "reference"]
