"""The user-facing layer on a GPU, for both GPU backends: NaN/Inf propagation, autocast,
torch.compile, CUDA graphs, and 20 SGD steps of a small CMPE-SE ResNet against the reference."""
import pytest
import torch

from cmpe_se_fused import CMPESE, CMPESEReference
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.models import preact_resnet

GPU_BACKENDS = ["cuda", "triton"]


def _need(backend):
    reasons = BACKENDS[backend].not_supported_reasons(torch.empty(1, device="cuda"))
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def _pair(backend, mode, training, channels=64):
    torch.manual_seed(0)
    m = CMPESE(channels, mode=mode, reduction=8, fold_width=8, backend=backend).cuda().train(training)
    ref = CMPESEReference(channels, mode=mode, reduction=8, fold_width=8).cuda().train(training)
    ref.load_state_dict(m.state_dict())
    return m, ref


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3"])
def test_nan_inf_propagate(backend, mode):
    _need(backend)
    m, ref = _pair(backend, mode, False)
    u, x = torch.randn(3, 64, 5, 5, device="cuda"), torch.randn(3, 64, 5, 5, device="cuda")
    u[0, 3, 1, 1] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    y, y_ref = m(u, x), ref(u, x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_bf16(backend):
    _need(backend)
    m, ref = _pair(backend, "folded_3x3", True)
    u, x = torch.randn(8, 64, 6, 6, device="cuda"), torch.randn(8, 64, 6, 6, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(u, x)
    assert y.dtype == torch.bfloat16 and m.fc1.weight.dtype == torch.float32
    y_ref = ref(u.bfloat16(), x.bfloat16())
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(m.pair_bn.running_mean, ref.pair_bn.running_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["folded_3x3"])
def test_compile_fullgraph(backend, mode):
    _need(backend)
    torch._dynamo.reset()
    m, ref = _pair(backend, mode, True)
    cm = torch.compile(m, fullgraph=True)
    u = torch.randn(4, 64, 8, 8, device="cuda", requires_grad=True)
    x = torch.randn(4, 64, 8, 8, device="cuda", requires_grad=True)
    y, y_ref = cm(u, x), ref(u, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(y.sum(), (u, x))
    g_ref = torch.autograd.grad(y_ref.sum(), (u, x))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    _need(backend)
    m, ref = _pair(backend, "folded_3x3", False)
    u, x = torch.randn(4, 64, 8, 8, device="cuda"), torch.randn(4, 64, 8, 8, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up: compile / cache launch configurations outside the capture
            m(u, x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = m(u, x)
    u.copy_(torch.randn_like(u))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, ref(u, x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["se", "folded_3x3"])
def test_sgd_20_steps_matches_reference(backend, mode):
    _need(backend)
    torch.manual_seed(0)
    model = preact_resnet(20, se_mode=mode, fold_width=4, backend=backend).cuda()
    ref = preact_resnet(20, se_mode=mode, fold_width=4, backend="reference").cuda()
    ref.load_state_dict(model.state_dict())
    opts = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True) for net in (model, ref)]
    data = torch.randn(16, 3, 16, 16, device="cuda")
    target = torch.randint(0, 10, (16,), device="cuda")
    # TF32 convolutions would turn the layers' 1e-7 differences into 1e-3 ones at the first step
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    try:
        _train(model, ref, opts, data, target)
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic) = flags
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=k)


def _train(model, ref, opts, data, target):
    for _ in range(20):
        for net, opt in zip((model, ref), opts):
            loss = torch.nn.functional.cross_entropy(net(data), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
