# torch.topk over the block scores dumped by bench/index_topk_stages.cu ([rows, ld] fp32, -inf past
# each row's local block): the baseline stage 2 of the CUDA index branch is compared with.
#   python3 bench/index_topk_vs_torch.py /tmp/index_scores_*.f32
import re
import sys

import numpy as np
import torch

for path in sys.argv[1:]:
    rows, ld = map(int, re.search(r"_(\d+)_(\d+)\.f32$", path).groups())
    x = torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(rows, ld)).cuda()
    for _ in range(3):
        torch.topk(x, 15, dim=1)
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.topk(x, 15, dim=1)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    print(f"torch.topk k=15 over [{rows} x {ld}] fp32: median {times[len(times) // 2]:.3f} ms")
    del x
    torch.cuda.empty_cache()
