"""``python -m cmpe_se_fused.demo``: build a small CMPE-SE pre-act ResNet, run a few training steps
with the best backend for this machine, and check it against the eager reference."""
from __future__ import annotations

import time

import torch

import cmpe_se_fused
from cmpe_se_fused.models import preact_resnet


def main(steps: int = 3, batch: int = 16) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = preact_resnet(20, num_classes=10, se_mode="folded_3x3", fold_width=4).to(device)
    ref = preact_resnet(20, num_classes=10, se_mode="folded_3x3", fold_width=4, backend="reference").to(device)
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    layer = next(m for m in model.modules() if isinstance(m, cmpe_se_fused.CMPESE))
    chosen = cmpe_se_fused.dispatch.choose(layer.backend, x)
    print(f"CMPE-SE pre-act ResNet-20 (folded_3x3), {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M params, "
          f"device={device}, backend={chosen.name}")
    with torch.no_grad():
        model.eval(), ref.eval()
        diff = (model(x) - ref(x)).abs().max().item()
        model.train()
    print(f"eval logits vs eager reference: max |diff| = {diff:.2e}")
    for step in range(steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"step {step}: loss {loss.item():.4f}  ({(time.perf_counter() - t0) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
