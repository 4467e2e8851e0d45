"""Limit errors say where in the script the limit hit, even inside helper
functions (Rhai itself reports them at the outermost call)."""

from __future__ import annotations

import pytest

from rbee import errors
from rbee.scheduler import Policy

SPIN_IN_HELPER = """\
fn helper(n) {
    let x = 0;
    while true {
        x += n;
    }
}
fn schedule_job(job, pools, workers) {
    let y = 1;
    helper(y)
}
"""


@pytest.mark.parametrize(
    "source, limits, error, line",
    [
        (SPIN_IN_HELPER, {"max_operations": 5000}, errors.TooManyOperations, 4),
        (SPIN_IN_HELPER, {"timeout_ms": 20}, errors.PolicyTimeout, 4),
        ("fn schedule_job(job, pools, workers) {\n    let s = \"ab\";\n"
         "    loop { s += s; }\n}\n", None, errors.DataTooLarge, 3),
        ("fn f(n) { f(n + 1) }\nfn schedule_job(job, pools, workers) {\n    f(1)\n}\n",
         None, errors.StackOverflow, 1),
    ],
)
def test_the_error_names_the_line_where_the_limit_hit(source, limits, error, line):
    policy = Policy.from_source(source, name="p.rhai", limits=limits)
    with pytest.raises(error) as caught:
        policy.decide({"id": "job-1"}, {})
    assert caught.value.line == line
    assert str(caught.value).startswith(f"p.rhai:{line}:")


def test_locating_a_failure_leaves_round_robin_alone():
    policy = Policy.from_source(
        "fn schedule_job(job, pools, workers) {\n"
        "    let w = workers.round_robin();\n"
        "    if job.spin { loop { } }\n"
        "    w\n}\n", limits={"max_operations": 2000})
    state = {"workers": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}
    assert policy.decide({"id": "1", "spin": False}, state).worker_id == "a"
    with pytest.raises(errors.TooManyOperations):
        policy.decide({"id": "2", "spin": True}, state)
    # The failed decision turned the rotation once; the re-run that located
    # the error did not turn it again.
    assert policy.decide({"id": "3", "spin": False}, state).worker_id == "c"
