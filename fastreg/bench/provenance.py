"""Where the numbers come from: the device's name, the commit of the checkout fastreg
is imported from, and :func:`environment`, what a report's header and JSON record."""

import datetime
import os
import platform
import subprocess

import torch

import fastreg
from fastreg.bench.load import load_average


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def commit():
    """git rev-parse --short HEAD of the checkout fastreg is imported from ("-dirty" when
    tracked files differ from it); where that is no git checkout (a copy of the tree on a
    GPU machine), the environment variable FASTREG_COMMIT, else "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastreg.__file__)))
    fallback = os.environ.get("FASTREG_COMMIT") or "unknown"
    try:
        top = subprocess.run(
            ["git", "-C", root, "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return fallback
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment(device):
    """What the header and the JSON say about where the numbers come from."""
    info = fastreg.info()
    kind = torch.device(device).type
    kernels = info["cuda_kernels"] if kind == "cuda" else info["cpu_kernels"]
    return {
        "device": f"{kind}: {device_name(device)}",
        "device_type": kind,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastreg": info["version"],
        "backend": ("extension" if kernels else "reference")
        + f" ({kind} kernels "
        + ("built)" if kernels else "missing: the pure-PyTorch fallback runs)"),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": load_average(),
    }
