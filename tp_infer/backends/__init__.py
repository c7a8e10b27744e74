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

A backend's method either handles its operands or hands them to the reference's (its base class); that choice is made
from shapes, dtypes and devices before any argument is built."""

from tp_infer.backends.reference import Backend, reference

BACKENDS = ("auto", "torch", "cpu")


def pick(name: str, device_type: str, dtype_name: str) -> Backend:
    """The backend called `name`, or for "auto" the fastest that covers this device and compute dtype: `cpu` for
    fp32 on the CPU (the compiled kernels take fp32 only), else `torch`."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cpu" if device_type == "cpu" and dtype_name == "fp32" else "torch"
    if name == "cpu":
        from tp_infer.backends.cpu import CpuBackend

        return CpuBackend()
    return reference()


__all__ = ["BACKENDS", "Backend", "pick", "reference"]
