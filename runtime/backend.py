"""One place that sets MindSpore up: graph mode, the device, thread count, quiet logs; and that says, before
anything loads, whether this machine has the backend a device config names."""
import ctypes
import os

_configured = False

# What each MindSpore backend needs beyond the PyPI wheel (which carries every backend's plugin): the
# Ascend backend runs on CANN, whose runtime library the driver and toolkit install.
_REQUIREMENTS = {
    "Ascend": ("libascendcl.so", "CANN's runtime (libascendcl.so, from the Ascend driver and toolkit)",
               "install the CANN toolkit and driver for the card, `source /usr/local/Ascend/ascend-toolkit/set_env.sh`, "
               "and check that `npu-smi info` lists the card"),
}


class BackendMissing(RuntimeError):
    """The device config names a MindSpore backend this machine cannot run."""


def require(backend: str) -> None:
    """Raise `BackendMissing` naming what is missing and how to check for it, when `backend` cannot run here.
    The CPU backend always can."""
    if backend == "CPU":
        return
    if backend not in _REQUIREMENTS:
        raise BackendMissing(f"MindSpore backend {backend!r} is not one Ferry runs on (CPU, Ascend)")
    library, what, remedy = _REQUIREMENTS[backend]
    try:
        ctypes.CDLL(library)
    except OSError:
        raise BackendMissing(f"MindSpore's {backend} backend needs {what}, which this machine does not have: "
                             f"{remedy}") from None


def configure(device: str = "CPU", threads: int | None = None) -> None:
    """Compile every Cell call as a static graph. Idempotent; call before building Cells."""
    global _configured
    if _configured:
        return
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ INFO/WARNING logs drown the output
    import mindspore as ms

    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE)
    if threads:
        ms.device_context.cpu.op_tuning.threads_num(threads)
        os.environ["FERRY_CPU_THREADS"] = str(threads)  # read once, when the kernel library loads
    _configured = True
