"""One place that sets MindSpore up: graph mode, the CPU device, thread count, quiet logs."""
import os

_configured = False


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
