"""benchmarks/step_profile.py reads a torch.profiler Chrome trace into a step summary. The GPU half of a trace cannot be
made on this CPU-only machine, so it is written here in the trace format kineto exports."""

from __future__ import annotations

import pytest
import step_profile  # benchmarks/, on sys.path through this folder's conftest.py

pytestmark = pytest.mark.bench


def event(cat: str, name: str, ts_ms: float, dur_ms: float, tid: int = 1, correlation: int | None = None) -> dict:
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts_ms * 1e3, "dur": dur_ms * 1e3, "pid": 0, "tid": tid}
    if correlation is not None:
        e["args"] = {"correlation": correlation}
    return e


def test_gpu_busy_time_is_the_union_of_kernels_copies_and_memsets_and_sync_waits_are_summed():
    trace = {"traceEvents": [
        event("kernel", "gemm", 0, 10), event("kernel", "gemm", 5, 10),  # overlapping (two streams): 15 us
        event("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 20, 4, correlation=7),
        event("gpu_memset", "Memset", 30, 2),
        event("gpu_user_annotation", "ProfilerStep", 0, 1000),  # a range, not GPU work
        event("cuda_runtime", "cudaLaunchKernel", 0, 3), event("cuda_runtime", "cudaLaunchKernel", 4, 3),
        event("cuda_runtime", "cudaStreamSynchronize", 40, 50),
        event("cuda_runtime", "cudaMemcpyAsync", 19, 10, correlation=7),  # the pageable copy below: the CPU waits
        event("cpu_op", "aten::mm", 0, 2, tid=1), event("cpu_op", "aten::add", 3, 2, tid=1),
        event("cpu_op", "aten::mm", 0, 2, tid=2),
        {"ph": "f", "cat": "ac2g", "name": "flow", "ts": 0},  # flow arrows carry no duration
    ]}
    summary = step_profile.summarize_trace(trace, steps=2, wall_s=0.2)  # times in ms
    gpu = summary["gpu"]
    assert gpu["busy_s_per_step"] == pytest.approx((15 + 4 + 2) / 2 / 1e3)
    assert gpu["busy_fraction"] == pytest.approx(0.021 / 0.2, abs=1e-3)
    assert gpu["kernels_per_step"] == 1.0
    assert gpu["top"][0] == ["gemm", 10.0, 1.0]  # 20 ms in 2 calls over 2 steps
    assert gpu["by_kind_ms_per_step"] == {"matmul": 10.0, "copy": 3.0}  # the memcpy 2 + the memset 1 per step
    assert summary["sync_wait_s_per_step"] == pytest.approx(60 / 2 / 1e3)  # cudaStreamSynchronize + cudaMemcpyAsync
    assert summary["runtime"][0] == ["cudaStreamSynchronize", 25.0, 0.5]
    assert summary["cpu_ops_per_step"] == {"1": 1.0, "2": 0.5}
    assert summary["wall_s_per_step"] == 0.1


def test_a_cpu_only_trace_has_no_gpu_numbers():
    summary = step_profile.summarize_trace({"traceEvents": [event("cpu_op", "aten::mm", 0, 2)]}, steps=1, wall_s=1.0)
    assert summary["gpu"] == {"busy_s_per_step": 0.0, "busy_fraction": None, "kernels_per_step": 0.0, "top": [],
                              "by_kind_ms_per_step": {}}


@pytest.mark.parametrize("name,kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off", "matmul"),
    ("triton_per_fused_add_mul_native_layer_norm_0", "triton"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda",
     "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl", "elementwise"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>", "conv"),
    ("Memset (Device)", "copy"),
    ("some_custom_kernel", "other"),
])
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
    assert step_profile.kernel_kind(name) == kind


@pytest.mark.parametrize("spec", ["0:3:/tmp/x.json", "2:0:/tmp/x.json", "2:3"])
def test_a_bad_profile_spec_is_refused(spec):
    with pytest.raises(ValueError):
        step_profile.parse_spec(spec)


def test_a_synchronising_call_is_counted_at_its_python_call_site_and_other_warnings_pass_through(monkeypatch):
    import warnings

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *args: shown.append(str(args[0])))
    sites = step_profile.SyncSites()  # start() on a CUDA machine would also install it as warnings.showwarning

    def read_loss():  # stands in for `loss.item()` in a training loop
        sites._record(UserWarning("called a synchronizing CUDA operation"), UserWarning, "x.py", 1)

    for _ in range(2):
        read_loss()
    sites._record(UserWarning("something else"), UserWarning, "x.py", 2)
    (where, count), = sites.sites.items()
    assert count == 2 and where.startswith("[MainThread] test_step_profile.py:")
    assert ":read_loss <- test_step_profile.py:" in where
    assert shown == ["something else"]


def test_a_profiler_failure_is_written_down_and_the_training_goes_on(tmp_path, monkeypatch):
    import json

    import torch

    prof = step_profile.install(1, 2, tmp_path / "profile.json")
    monkeypatch.setattr(prof, "_end", lambda: (_ for _ in ()).throw(RuntimeError("CUPTI is unhappy")))
    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=0.1)
    try:
        for _ in range(4):  # the window opens after step 1 and its end fails after step 3
            weight.sum().backward()
            opt.step()
            opt.zero_grad()
    finally:
        prof.remove()
    assert json.loads((tmp_path / "profile.json").read_text()) == {"error": "RuntimeError: CUPTI is unhappy"}
    assert weight.detach().tolist() == pytest.approx([0.6] * 3)  # all four steps ran
    assert prof.handle is None and prof.seen == 3  # the hook went with the failure: step 4 was not counted


def test_only_copies_that_block_the_host_and_synchronizations_count_as_waits_and_the_closing_sync_does_not():
    trace = {"traceEvents": [
        event("cuda_runtime", "cudaMemcpyAsync", 0, 1, correlation=1), event("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 1, 1, correlation=1),
        event("cuda_runtime", "cudaMemcpyAsync", 2, 1, correlation=2), event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 3, 1, correlation=2),
        event("cuda_runtime", "cudaMemcpyAsync", 4, 8, correlation=3), event("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 11, 1, correlation=3),
        event("cuda_runtime", "cudaStreamSynchronize", 20, 5),
        event("user_annotation", step_profile.OWN_SYNC, 30, 40),
        event("cuda_runtime", "cudaDeviceSynchronize", 31, 38),  # the profiler's own wait at the window's end
    ]}
    assert step_profile.summarize_trace(trace, steps=1, wall_s=0.1)["sync_wait_s_per_step"] == 0.013  # 8 + 5 ms


def test_stopping_the_sync_sites_restores_only_what_start_changed_and_never_raises(monkeypatch):
    import warnings

    sites = step_profile.SyncSites()
    shown = warnings.showwarning
    warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")
    ours = warnings.filters[0]
    sites._show, sites._saved = shown, (ours, 0)  # what start() saves on a CUDA machine
    warnings.showwarning = sites._record
    warnings.filterwarnings("ignore", message="added by someone else meanwhile")
    theirs = warnings.filters[0]
    import torch

    def broken(mode):
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", broken)  # a failing undo step stops none of the others
    try:
        sites.stop()
        assert warnings.showwarning is shown
        assert ours not in warnings.filters and theirs in warnings.filters
        sites.stop()  # twice: nothing left to undo
    finally:
        warnings.showwarning = shown
        warnings.filters[:] = [f for f in warnings.filters if f not in (ours, theirs)]
