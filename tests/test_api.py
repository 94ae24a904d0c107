"""Pins the public API: a change here is a change users see."""
import inspect

import fastsplit


def test_public_names():
    assert sorted(fastsplit.__all__) == sorted([
        "__version__", "build_info", "set_debug", "set_tuning", "steered_linear", "steered_linear_ref", "SteeredLinear",
        "split_loss", "split_loss_ref", "SplitLoss",
        "attach", "Steering", "load_steering", "Pair", "load_pairs", "encode_pair", "split_pairs", "balance_answers", "demo_pairs",
        "train", "diffmean", "generate_sweep", "load_default_model", "load_model", "export_steering",
        "logodds_sweep", "Sweep", "fit_curves", "Fit", "operating_point", "analyze", "plot_sweep", "compare",
    ])
    for name in fastsplit.__all__:
        assert hasattr(fastsplit, name), name


def test_steered_linear_signature():
    sig = inspect.signature(fastsplit.steered_linear)
    assert list(sig.parameters) == ["x", "weight", "bias", "delta_weight", "lora_a", "lora_b",
                                    "delta_bias", "m1", "m2", "backend"]
    kw_only = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert kw_only == ["delta_weight", "lora_a", "lora_b", "delta_bias", "m1", "m2", "backend"]
    assert sig.parameters["m1"].default == 1.0 and sig.parameters["m2"].default is None
    assert sig.parameters["backend"].default == "auto"


def test_export_signatures():
    kw = lambda f: [n for n, p in inspect.signature(f).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert list(inspect.signature(fastsplit.export_steering).parameters)[:2] == ["steering", "out"]
    assert kw(fastsplit.export_steering) == ["m", "format", "model", "full", "check_model_name"]
    assert kw(fastsplit.Steering.export) == ["m", "format", "full"]


def test_build_info_keys():
    info = fastsplit.build_info()
    assert {"native_cpu", "cuda_kernels_compiled", "cuda_device_present", "cuda_archs", "triton", "torch"} <= set(info)
    assert info["torch"] == __import__("torch").__version__
    assert info["transformers"] == __import__("transformers").__version__
    assert info["transformers_tested"] == (info["transformers"] in fastsplit.hf.internals.TESTED_TRANSFORMERS)


def test_split_loss_signature():
    sig = inspect.signature(fastsplit.split_loss)
    assert list(sig.parameters) == ["hidden_pos", "hidden_neg", "lm_head_weight", "labels_pos", "labels_neg",
                                    "lambda_p", "lambda_n", "gamma", "theta", "reduction", "ignore_index",
                                    "shift", "lm_head_bias", "logit_softcap", "return_parts", "backend"]
    d = {n: p.default for n, p in sig.parameters.items()}
    assert (d["lambda_p"], d["lambda_n"], d["gamma"], d["theta"]) == (1.0, 0.5, 5.0, 0.4)
    assert (d["reduction"], d["ignore_index"], d["shift"], d["backend"]) == ("batch", -100, True, "auto")


def test_workflow_signatures():
    kw = lambda f: [n for n, p in inspect.signature(f).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert list(inspect.signature(fastsplit.attach).parameters) == ["model", "layer", "form", "rank", "site", "backend",
                                                                    "delta_bias"]
    assert kw(fastsplit.train)[:12] == ["loss", "lambda_p", "lambda_n", "gamma", "theta", "reduction",
                                        "steering_factors", "lr", "epochs", "batch_size", "grad_accum", "seed"]
    assert "pair_types" in kw(fastsplit.train)
    assert kw(fastsplit.generate_sweep)[:2] == ["max_new_tokens", "do_sample"]
    assert kw(fastsplit.logodds_sweep)[:2] == ["length_norm", "batch_size"]
    assert list(inspect.signature(fastsplit.fit_curves).parameters)[:3] == ["multipliers", "values", "kind"]
    assert kw(fastsplit.operating_point) == ["max_util_drop", "grid"]
    for f in (fastsplit.train, fastsplit.generate_sweep, fastsplit.logodds_sweep):  # torch.distributed
        assert "group" in kw(f), f.__name__
    for f in (fastsplit.generate_sweep, fastsplit.logodds_sweep):  # resumable
        assert {"checkpoint_dir", "resume"} <= set(kw(f)), f.__name__
    assert callable(fastsplit.dist.active_group) and callable(fastsplit.dist.shard_range)
