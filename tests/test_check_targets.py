"""The GPU code compiled for sm_80/90/100/120 without a GPU (fastsplit.kernels.check_targets).

The check runs in subprocesses without TRITON_INTERPRET (the conftest sets it for this process, and the
interpreter replaces the kernels the check compiles)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *args, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("targets") / "targets.json"
    r = _python("", "-m", "fastsplit.kernels.check_targets", "--json", str(path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return json.loads(path.read_text()), r.stdout


def test_every_kernel_and_default_config_compiles_for_every_target(table):
    doc, out = table
    from fastsplit.kernels import check_targets as ct

    assert doc["failures"] == 0 and "0 failing" in out
    assert out.count("(recorded) spills") == doc["spilling"]
    assert doc["targets"] == [f"sm_{t}" for t in ct.TARGETS]
    rows = doc["rows"]
    kernels = {r["kernel"].split(":")[1] for r in rows}
    assert kernels == {"_steered_linear_fwd_kernel", "_steered_linear_reduce_kernel", "_split_fused_kernel"}
    for t in ct.TARGETS:
        mine = [r for r in rows if r["target"] == f"sm_{t}"]
        # every decode case at its default config there, and the fixed config on the suite's target
        decode = [r for r in mine if r["kernel"].endswith("_fwd_kernel")]
        defaults = {json.dumps(r["case"], sort_keys=True) for r in decode if r["config"] != "fixed"}
        assert len(defaults) == len(ct.decode_cases("ci")), t
        assert any(r["config"] == "fixed" for r in decode) == (t == ct.FIXED_TARGET)
        assert len([r for r in mine if r["kernel"].endswith("_split_fused_kernel")]) == len(ct.split_loss_cases("ci"))
        for r in mine:  # each row can be recompiled alone, and carries its figures
            assert r["signature"] and r["options"] is not None and r["limit"] == ct.TARGETS[t]["smem"]
            assert isinstance(r["shared"], int) and r["shared"] <= r["limit"] and r["regs"] > 0
            assert "error" not in r and isinstance(r["spill_stores"], int)
            assert bool(r["spills"]) == (r["spill_stores"] > 0)  # recorded (and listed in the summary), not failed
            if r["estimate"] is not None:
                assert r["estimate"] >= r["shared"], r
    cuda = doc["cuda"]
    if cuda.get("skipped"):
        pytest.skip(f"CUDA extension: {cuda['skipped']}")
    assert {r["target"] for r in cuda["rows"]} >= {"sm_80", "sm_90a"}
    assert {r["kernel"] for r in cuda["rows"]} >= {"split_lse_kernel<bf16>", "split_grad_kernel<fp32>"}
    assert all(not r["problems"] and r["regs"] > 0 for r in cuda["rows"])


def test_one_entry_recompiles_alone_to_the_same_figures(table):
    doc, _ = table
    row = next(r for r in doc["rows"] if r["target"] == "sm_90" and r["config"] == "fixed")
    code = textwrap.dedent(f"""
        import json
        from fastsplit.kernels import check_targets as ct
        row = json.loads({json.dumps(json.dumps(row))})
        again = ct.compile_entry({{k: row[k] for k in ("kernel", "target", "signature", "constexprs", "attrs",
                                                      "options", "estimate", "limit", "launched", "case", "config")}})
        print(json.dumps([again["shared"], again["regs"], again["spill_stores"]]))
    """)
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [row["shared"], row["regs"], row["spill_stores"]]


def test_a_planted_config_over_the_limit_is_named():
    """A config whose hand estimate claims it fits sm_90 while Triton allocates more than sm_90 has: the check
    fails and names the kernel, the target, the config and both figures."""
    code = textwrap.dedent("""
        import triton
        from fastsplit.kernels import check_targets as ct
        launch = next(l for l in ct.launches("ci", 90) if l.config.startswith("gpu_configs")
                      and l.case["form"] == "local_weight" and l.case["dtype"] == "bf16" and l.case["rows"] == 64)
        launch.args.update(BLOCK_K=256)
        launch.options = {"num_warps": 8, "num_stages": 6}
        launch.estimate, launch.config = 4096, "planted"
        row = ct.compile_entry(ct.entry_of(launch, 90))
        row["problems"] = ct.problems(row)
        print(ct.summary({"entries": 1, "launched": 1, "targets": ["sm_90"], "seconds": 0, "triton": "",
                          "failures": 1, "rows": [row]}))
    """)
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "1 failing" in out and "_steered_linear_fwd_kernel sm_90 planted" in out, out
    assert "over the target's 232448" in out and "hand estimate 4096 B is below" in out, out


def test_bad_arguments_exit_2_in_one_line():
    for args in (["--targets", "75"], ["--targets", "x"], ["--workers", "0"]):
        r = _python("", "-m", "fastsplit.kernels.check_targets", *args)
        assert r.returncode == 2 and "error: --" in r.stderr.strip().splitlines()[-1], r.stderr
