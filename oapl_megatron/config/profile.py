"""Config of run-time profiling: a torch.profiler trace for a step range, NVTX ranges, and the MFU peak."""

from __future__ import annotations

from pydantic import Field, field_validator

from oapl_megatron.config.base import StrictModel


class ProfileConfig(StrictModel):
    """``profile.steps=[a,b]`` traces optimizer steps a..b (inclusive) on every rank into run_dir/traces."""

    steps: list[int] | None = Field(
        None, description="[first, last] optimizer steps to trace with torch.profiler (Chrome/TensorBoard "
                          "trace per rank under run_dir/traces); None = no trace.")
    nvtx: bool = Field(True, description="On GPU: NVTX ranges around the loop phases (for Nsight Systems).")
    peak_tflops: float | None = Field(
        None, gt=0, description="Per-rank peak TFLOP/s for the logged trainer MFU; None = no MFU in the metrics "
                                "(oapl-profile run can still compute it with --peak-tflops or a peak.json).")
    record_shapes: bool = Field(False, description="torch.profiler record_shapes (bigger traces).")

    @field_validator("steps")
    @classmethod
    def _range(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if len(v) != 2 or v[0] < 1 or v[1] < v[0]:
            raise ValueError(f"profile.steps={v}: expected [first, last] with 1 <= first <= last")
        return v
