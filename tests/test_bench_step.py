"""CPU smoke of `foundation bench step`: tiny ViT, iBOT and MAE at ZeRO-1, ours against the plain reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "model", "objective", "batch", "zero", "precision", "world_size", "ours_step_s", "ref_step_s",
    "ours_images_per_s", "ref_images_per_s", "ratio", "flops_per_step", "gflop_per_image", "ours_tflops",
    "ref_tflops", "ours_mfu", "ref_mfu", "ours_peak_gb", "ref_peak_gb", "ours_loss_step0", "ref_loss_step0",
    "loss_step0_abs_diff", "losses_finite", "ours_step_s_repeats", "ref_step_s_repeats",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "step.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "foundation", "bench", "step", "--config", "benchmarks/step_cpu.yaml",
           "--objective", "ibot", "mae", "--zero", "1", "--precision", "fp32", "--batch", "4", "--out", str(out),
           "--profile", "1", "bench.step.warmup=1", "bench.step.steps=2", "bench.step.repeats=2",
           "bench.step.gemm_size_cpu=128"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/ref" in proc.stdout  # the terminal table
    return json.loads(out.read_text())


def test_json_has_every_figure_and_the_environment(result: dict) -> None:
    assert result["kind"] == "step"
    assert {"torch", "deepspeed", "timm", "python", "device", "gpu"} <= set(result["environment"])
    assert result["gemm"]["tflops"] > 0
    assert [r["objective"] for r in result["results"]] == ["ibot", "mae"]
    for row in result["results"]:
        assert set(row) >= ROW_KEYS, sorted(ROW_KEYS - set(row))
        assert row["zero"] == 1 and row["precision"] == "fp32" and row["batch"] == 4
        assert len(row["ours_step_s_repeats"]) == 2 and row["ours_images_per_s"] > 0 and row["flops_per_step"] > 0
        assert math.isclose(row["ratio"], row["ref_step_s"] / row["ours_step_s"], rel_tol=1e-9)


def test_both_sides_compute_the_same_finite_loss(result: dict) -> None:
    for row in result["results"]:
        assert row["losses_finite"], row
        # same weights, batch and random draws at step 0 in fp32: the same mathematics gives the same loss
        assert row["loss_step0_abs_diff"] <= 1e-5 * max(1.0, abs(row["ref_loss_step0"])), row


def test_profile_lists_each_sides_host_operators(result: dict) -> None:
    for row in result["results"]:
        for side in ("ours", "ref"):
            profile = row[f"{side}_profile"]
            assert profile["steps"] == 1 and profile["device_ms_per_step"] is None  # no device kernels on the CPU
            names = {op["name"] for op in profile["top_host_ops"]}
            assert names & {"aten::mm", "aten::addmm"}, names  # the ViT's linear layers
            assert all(op["ms_per_step"] >= 0 and op["calls_per_step"] > 0 for op in profile["top_host_ops"])
            assert len(profile["top_host_ops"]) == 25  # bench.step.profile_top


@pytest.mark.parametrize(("kernel", "kind"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer_foreach"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "reduction"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
])
def test_kernel_kinds(kernel: str, kind: str) -> None:
    from foundation.perf.profile import kernel_kind

    assert kernel_kind(kernel) == kind


@pytest.mark.gpu
def test_step_bench_on_the_gpu(tmp_path: Path) -> None:
    """On a GPU: bf16, fused AdamW, ZeRO-1 and ZeRO-3, GEMM and peak memory from the device."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "step.json"
    cmd = [sys.executable, "-m", "foundation", "bench", "step", "--config", "benchmarks/step_cpu.yaml",
           "--objective", "ibot", "mae", "--zero", "1", "3", "--out", str(out), "--profile", "2",
           "bench.step.gemm_size=2048"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["gpu"] and result["gemm"]["tflops"] > 1
    for row in result["results"]:
        assert row["losses_finite"] and row["ours_peak_gb"] > 0 and 0 < row["ours_mfu"] < 1, row
        assert abs(row["ours_loss_step0"] - row["ref_loss_step0"]) < 0.05 * abs(row["ref_loss_step0"]), row
        for side in ("ours", "ref"):
            kinds = row[f"{side}_profile"]["device_ms_per_step_by_kind"]
            assert kinds["matmul"] > 0 and 0 <= row[f"{side}_idle_share"] < 1, (side, kinds)
            assert row[f"{side}_device_ms"] <= row[f"{side}_step_s"] * 1000 * 1.2, row  # kernels fit in the step


@pytest.mark.parametrize(("argv", "objective", "model", "overrides"), [
    (["--objective", "mae", "model.depth=24", "--zero", "3"], ["mae"], None, ["model.depth=24"]),
    (["--model", "vit_test", "train.lr=1e-4", "--objective", "ibot", "mae", "a.b=1"], ["ibot", "mae"], ["vit_test"],
     ["train.lr=1e-4", "a.b=1"]),
    (["x.y=2", "--objective", "mae"], ["mae"], None, ["x.y=2"]),
    (["--objective", "mae", "--batch", "4", "a.b=1", "--zero", "1", "3", "c.d=false"], ["mae"], None,
     ["a.b=1", "c.d=false"]),
])
def test_overrides_after_a_list_option_stay_overrides(argv: list[str], objective: list[str],
                                                       model: list[str] | None, overrides: list[str]) -> None:
    import argparse

    from foundation.perf.step import add_arguments, take_swallowed_overrides

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    take_swallowed_overrides(args)
    assert (args.objective, args.model, args.overrides) == (objective, model, overrides)
    assert all(isinstance(v, int) for v in [*(args.batch or []), *(args.zero or [])])
