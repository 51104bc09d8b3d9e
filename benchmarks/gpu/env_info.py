"""gpu_check.sh's `env` step: versions, the GPU and its compute capability, which optional packages import."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys

import accelerate
import peft
import torch
import transformers

gpu = torch.cuda.is_available()
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "accelerate": accelerate.__version__,
    "gpu": torch.cuda.get_device_name() if gpu else None,
    "capability": list(torch.cuda.get_device_capability()) if gpu else None,
    "bf16": gpu and torch.cuda.is_bf16_supported(),
    "optional": {
        m: importlib.util.find_spec(m) is not None
        for m in ("vllm", "pytest", "matplotlib", "rich", "datasets", "h5py", "gguf")
    },
}
if info["optional"]["vllm"]:
    import vllm

    info["vllm"] = vllm.__version__
text = json.dumps(info, indent=1)
print(text)
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(text + "\n")
