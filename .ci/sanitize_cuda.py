"""Every CUDA kernel of fastreg once, on small odd-sized and misaligned inputs, for
compute-sanitizer (memcheck, racecheck, initcheck, synccheck): `.ci/gpu-check` runs it."""

import torch

import fastreg

assert fastreg.info()["cuda_kernels"], fastreg.info()
dev = "cuda"
for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    for numel, start in ((1, 0), (1023, 1), (4099, 3), (100_003, 0)):
        base = torch.randn(numel + start, device=dev, dtype=dtype)
        x = base[start:].requires_grad_()  # misaligned views take the scalar path
        for mode in ("bits", "bool", "recompute"):
            y = fastreg.dropout(x, 0.3, mask=mode)
            y.backward(torch.ones_like(y))
            cols = 7 if numel % 7 == 0 else 1
            xb = x.detach().view(-1, cols).requires_grad_()
            b = torch.randn(cols, device=dev, dtype=dtype, requires_grad=True)
            r = torch.randn_like(xb)
            fastreg.bias_dropout_add(xb, b, r, 0.3, mask=mode).sum().backward()
            for act in ("relu", "gelu", "gelu_tanh", "silu", None):
                fastreg.bias_act_dropout(xb, b, 0.3, act, mask=mode).sum().backward()
    img = torch.randn(3, 5, 7, 9, device=dev, dtype=dtype, requires_grad=True)
    fastreg.dropout2d(img, 0.4).sum().backward()
    params = [torch.randn(s, device=dev, dtype=dtype, requires_grad=True)
              for s in ((0,), (1,), (33, 7), (1025,), (300, 301))]
    fastreg.penalty(params, l1=1e-3, l2=1e-2).backward()
    fastreg.penalty_grad_(params, l1=1e-3, l2=1e-2)
    with torch.no_grad():
        fastreg.prox_l1_(params, 1e-2)
fastreg.dropout_mask((1 << 20) + 5, 0.5, 7, device=dev)
torch.cuda.synchronize()
print("sanitize_cuda: every kernel ran")
