"""Peak RSS of reading every weight of a checkpoint one tensor at a time through quant.loading.WeightStore
(for a GGUF file: memory-mapped and dequantized per tensor).

    ACCLLM_CACHE=/tmp/empty-cache .venv/bin/python benchmarks/gguf_memory.py fresh-cache [MODEL]
"""

import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.loading import WeightStore, load_config, resolve_source  # noqa: E402

tag = sys.argv[1] if len(sys.argv) > 1 else "run"
t0 = time.time()
p = resolve_source(sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m")
cfg = load_config(p)
st = WeightStore(p, cfg)
n = sum(st.get(k).numel() for k in st.keys())
print(f"{tag}: {n} floats read one tensor at a time, peak RSS "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB, {time.time() - t0:.1f} s wall, "
      f"cache {os.environ.get('ACCLLM_CACHE', 'default')}")
