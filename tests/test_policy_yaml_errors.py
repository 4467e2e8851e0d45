"""YAML policy errors: each names the rule and the field and points at the
line and column of the YAML file; and the tokenizer behind the shorthand."""

from __future__ import annotations

import textwrap

import pytest

from conftest import cluster_snapshot, make_job
from rbee.errors import PolicyCompileError, PolicyRuntimeError, TooManyOperations
from rbee.policy_yaml import compile_yaml
from rbee.rhai_lex import LexError, rewrite
from rbee.scheduler import Policy, Scheduler


def compile_error(text: str) -> PolicyCompileError:
    with pytest.raises(PolicyCompileError) as info:
        compile_yaml(textwrap.dedent(text).lstrip("\n"), "p.yaml")
    exc = info.value
    assert exc.file == "p.yaml"
    return exc


RULE = """
rules:
  - name: Image gen to CUDA
    condition: {task_type: image-gen}
    action:
      select: {select}
"""


# The place is a line and the text found there (the column is where it starts).
@pytest.mark.parametrize("text, message, line, at", [
    ("", "the policy is empty", 1, ""),
    ("- a\n- b\n", "expected a mapping with 'rules:', got a list", 1, "- a"),
    ("rule: []\n", "unknown key 'rule' (did you mean 'rules'?)", 1, "rule"),
    ("description: x\n", "missing 'rules:'", 1, "description"),
    ("rules: {}\n", "rules: expected a non-empty list of rules, got a mapping", 1, "{}"),
    ("rules: [3]\n", "rules[0]: rule: expected a mapping", 1, "3"),
    ("rules:\n  - name: A\n    action: {reject: x}\n",
     'rules[0] "A": condition: missing (use \'condition: true\'', 2, "name"),
    ("rules:\n  - name: A\n    condition: true\n",
     'rules[0] "A": action: missing', 2, "name"),
    ("rules:\n  - name: A\n    conditions: true\n    action: {reject: x}\n",
     'rules[0] "A": conditions: unknown key (did you mean \'condition\'?)', 3, "conditions"),
    ("rules:\n  - name: ''\n    condition: true\n    action: {reject: x}\n",
     "rules[0]: name: expected a non-empty string", 2, "''"),
    ("rules:\n  - {name: A, condition: {modle: x}, action: {reject: x}}\n",
     'rules[0] "A": condition.modle: unknown condition (did you mean \'model\'?)', 2, "modle"),
    ("rules:\n  - {name: A, condition: {}, action: {reject: x}}\n",
     "condition: an empty condition", 2, "{}"),
    ("rules:\n  - {name: A, condition: yes please, action: {reject: x}}\n",
     "condition: expected true, false or a mapping", 2, "yes please"),
    ("rules:\n  - {name: A, condition: {model: 7}, action: {reject: x}}\n",
     'rules[0] "A": condition.model: expected a non-empty string, got a number (7)', 2, "7"),
    ("rules:\n  - {name: A, condition: {any: []}, action: {reject: x}}\n",
     "condition.any: expected a non-empty list of conditions", 2, "[]"),
    ("rules:\n  - {name: A, condition: {all: [{region: EU}, {regoin: US}]}, "
     "action: {reject: x}}\n",
     'rules[0] "A": condition.all[1].regoin: unknown condition', 2, "regoin"),
    ("rules:\n  - {name: A, condition: {tags: [a]}, action: {reject: x}}\n",
     "condition.tags: expected a mapping of tag: value pairs", 2, "[a]"),
    ("rules:\n  - {name: A, condition: {tags: {team: [x]}}, action: {reject: x}}\n",
     "condition.tags.team: expected a string or a number", 2, "[x]"),
    ("rules:\n  - {name: A, condition: {max_tokens_over: -5}, action: {reject: x}}\n",
     "condition.max_tokens_over: expected a number of tokens, got a number (-5)", 2, "-5"),
    ("rules:\n  - {name: A, condition: {not: {not: {not: {not: {not: {not: {not: "
     "{region: EU}}}}}}}}, action: {reject: x}}\n",
     "condition.not.not.not.not.not.not.not: conditions nest more than 6 levels deep",
     2, "{region: EU}"),
    ("rules:\n  - {name: A, condition: true, action: select}\n",
     'rules[0] "A": action: expected a mapping with one of select, reject or wait', 2,
     "select"),
    ("rules:\n  - {name: A, condition: true, action: {reject: x, wait: y}}\n",
     "action: give exactly one of select, reject or wait (got reject and wait)", 2,
     "{reject"),
    ("rules:\n  - {name: A, condition: true, action: {selct: x}}\n",
     "action.selct: unknown action (did you mean 'select'?)", 2, "selct"),
    ("rules:\n  - {name: A, condition: true, action: {reject: {code: x, status: 200}}}\n",
     "action.reject.status: expected one of 400, 403, 404, 409, 429, 503, got a number (200)",
     2, "200"),
    ("rules:\n  - {name: A, condition: true, action: {reject: {status: 429}}}\n",
     "action.reject.code: missing", 2, "{status"),
    ("rules:\n  - {name: A, condition: true, action: {wait: {reason: x, ms: 1.5}}}\n",
     "action.wait.ms: expected milliseconds", 2, "1.5"),
    ("rules:\n  - {name: A, condition: true, action: {wait: {reason: x, after: 5}}}\n",
     "action.wait.after: unknown key", 2, "after"),
    ("rules:\n  - {name: A, condition: true, action: {select: [a]}}\n",
     "action.select: expected a non-empty string, got a list", 2, "[a]"),
    ("rules:\n  - {name: A, name: B, condition: true, action: {reject: x}}\n",
     "duplicate key 'name' (first given on line 2)", 2, "name: B"),
    ("rules:\n  - {name: A, condition: true, action: {reject: x}\n",
     "invalid YAML: did not find expected ',' or '}'", 3, ""),
])
def test_structure_errors_name_the_rule_the_field_and_the_place(text, message, line, at):
    exc = compile_error(text)
    assert message in exc.message
    source_line = (text.splitlines() + [""])[line - 1]
    assert (exc.line, exc.column) == (line, source_line.index(at) + 1), exc.message


# `^` marks where the error is expected (it is removed before compiling).
@pytest.mark.parametrize("pipeline, message", [
    # Found by the tokenizer.
    ('"workers.filter(gpus > 1).first^("', "'(' is never closed"),
    ('"workers.filter(gpus > 1)^).first()"', "unbalanced ')' (nothing open)"),
    ("\"workers.filter(backend == ^'cuda).first()\"", "the string starting here is never "
     "closed"),
    ('"workers.first()^; 1"', "a single expression is expected here: no ';'"),
    ('"workers.filter(^w.gpus > 1).first()"', "'w' is implicit in this shorthand"),
    ('"workers.filter(gpus > 1) ^§ 2"', "unexpected character '§'"),
    # Found by Rhai in the generated code, mapped back to the pipeline.
    ('"workers.filter(gpus > ^> 1).first()"', "Unexpected '>'"),
    ("workers.filter(gpus > ^> 1).first()", "Unexpected '>'"),  # plain YAML scalar
    ("'workers.filter(gpus > 1).first() ^workers'", "Expecting ';' to terminate this statement"),
    ("'^eval(\"workers.first()\")'", "'eval' is not allowed"),
])
def test_select_errors_point_into_the_pipeline(pipeline, message):
    text = RULE.replace("{select}", pipeline)
    column = text.splitlines()[5].index("^") + 1
    exc = compile_error(text.replace("^", ""))
    assert exc.message.startswith('rules[0] "Image gen to CUDA": action.select: ')
    assert message in exc.message
    assert (exc.line, exc.column) == (5, column), exc.message


def test_errors_inside_a_literal_block_point_at_its_line():
    exc = compile_error("""
        rules:
          - name: Cheapest
            condition:
              expr: |
                job.priority == "batch"
                  && job.max_tokens >> > 4
            action: {select: workers.first()}
    """)
    assert exc.message.startswith('rules[0] "Cheapest": condition.expr: Unexpected')
    # Line 6 of the file: `          && job.max_tokens >> > 4`; the lone `>`.
    assert (exc.line, exc.column) == (6, 32)


def test_runtime_errors_point_into_the_yaml_too():
    policy = Policy.from_source(textwrap.dedent("""\
        rules:
          - name: Typo
            condition: {expr: 'job.max_tokens != () && job.max_tokens.len() > 3'}
            action: {reject: x}
          - name: Misspelt helper
            condition: true
            action: {select: workers.leastloaded()}
    """), format="yaml", name="typo.yaml")
    with pytest.raises(PolicyRuntimeError) as info:
        policy.decide(make_job(), cluster_snapshot())
    exc = info.value
    assert exc.message.startswith('rules[0] "Typo": condition.expr: ')
    assert (exc.file, exc.line) == ("typo.yaml", 3)
    with pytest.raises(PolicyRuntimeError) as info:
        policy.decide(make_job(max_tokens=None), cluster_snapshot())
    exc = info.value
    assert exc.message.startswith('rules[1] "Misspelt helper": action.select: Function not found')
    # `    action: {select: workers.leastloaded()}`: the misspelt method.
    assert (exc.line, exc.column) == (7, 30)
    assert str(exc).startswith("typo.yaml:7:30: ")


def test_a_failing_yaml_policy_falls_back_like_any_policy():
    policy = Policy.from_source("rules: [{name: bad, condition: true, "
                                "action: {select: workers.nope()}}]", format="yaml")
    decision = Scheduler(policy).decide(make_job(), cluster_snapshot())
    assert decision.kind == "dispatch"
    failure = decision.fallback["failures"][0]
    assert failure["message"].startswith('rules[0] "bad": action.select: ')
    assert failure["line"] == 1


def test_limit_errors_of_a_yaml_policy_point_at_its_rules():
    policy = Policy.from_source(textwrap.dedent("""\
        rules:
          - name: Spin
            condition:
              expr: "workers.count({ let n = 0; while n < 100000 { n += 1; } true }) > 0"
            action: {reject: x}
    """), format="yaml", name="spin.yaml", limits={"max_operations": 10_000})
    assert policy.rules == ['rules[0] "Spin"']
    with pytest.raises(TooManyOperations) as info:
        policy.decide(make_job(), cluster_snapshot())
    # The engine locates where the limit hit, which maps back into the rule.
    assert str(info.value) == 'spin.yaml:4:62: rules[0] "Spin": condition.expr: decision ' \
        "ran more than 10000 operations (max_operations)"


def test_unknown_format_is_refused():
    with pytest.raises(PolicyCompileError, match="unknown policy format 'toml'"):
        Policy.from_source("x = 1", format="toml")


# --- the tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("workers.filter(gpus > 1).first()", "workers.filter(|w| w.gpus > 1).first()"),
    # Strings, property names, method names and `job` are left alone.
    ('workers.filter(model == "gpus").first()', 'workers.filter(|w| w.model == "gpus").first()'),
    ("workers.filter(geo.region == job.user.geo.region)",
     "workers.filter(|w| w.geo.region == job.user.geo.region)"),
    ("workers.filter(models.contains(job.model))",
     "workers.filter(|w| w.models.contains(job.model))"),
    ("workers.filter(labels?.room == 'office')",
     'workers.filter(|w| w.labels?.room == "office")'),
    # Helpers and keywords are not fields; calls are not fields.
    ("workers.filter(!tenant_over_quota(job.tenant_id) && true)",
     "workers.filter(|w| !tenant_over_quota(job.tenant_id) && true)"),
    ("workers.min_by(distance(job.user.geo.latitude, 0.0, geo.latitude, 0.0))",
     "workers.min_by(|w| distance(job.user.geo.latitude, 0.0, w.geo.latitude, 0.0))"),
    ("workers.filter(if gpus > 1 { true } else { false })",
     "workers.filter(|w| if w.gpus > 1 { true } else { false })"),
    # Closures stay as written, and their parameters are theirs.
    ("workers.filter(|x| x.gpus > 1)", "workers.filter(|x| x.gpus > 1)"),
    ("workers.filter(models.some(|m| m == job.model))",
     "workers.filter(|w| w.models.some(|m| m == job.model))"),
    ('workers.filter(Fn("big"))', 'workers.filter(Fn("big"))'),
    # Methods outside the list are not shorthands; ids of other methods stay.
    ("workers.with_model(job.model).sticky(job.session_id)",
     "workers.with_model(job.model).sticky(job.session_id)"),
    ("workers.filter(#{a: gpus}.a > 1)", "workers.filter(|w| #{a: w.gpus}.a > 1)"),
    # Local variables of a block are not fields either.
    ("workers.count({ let n = gpus; n > 1 })", "workers.count(|w| { let n = w.gpus; n > 1 })"),
    ("workers.count({ let t = 0; for g in gpu_ids { t += 1; } t > 1 })",
     "workers.count(|w| { let t = 0; for g in w.gpu_ids { t += 1; } t > 1 })"),
    # Numbers, comments and line breaks.
    ("workers.filter(vram_free >= 1_000 && load < 0.5e0) // big\n  .first()",
     "workers.filter(|w| w.vram_free >= 1_000 && w.load < 0.5e0) .first()"),
    ("'it\\'s'", '"it\'s"'),
    ("'say \"hi\"'", '"say \\"hi\\""'),
])
def test_rewrite(text, expected):
    assert rewrite(text).code == expected


def test_rewrite_keeps_the_original_offset_of_every_character():
    text = "workers.filter(gpus > 1).frist()"
    fragment = rewrite(text)
    at = fragment.code.index("frist")
    assert fragment.original_offset(at) == text.index("frist")
    at = fragment.code.index("gpus")
    assert fragment.original_offset(at) == text.index("gpus")


@pytest.mark.parametrize("text, offset", [
    ("", 0), ("workers.first(", 13), ("a)", 1), ("[1, 2)", 5), ("'x", 0), ("/* x", 0),
])
def test_rewrite_refuses_what_is_not_one_expression(text, offset):
    with pytest.raises(LexError) as info:
        rewrite(text)
    assert info.value.offset == offset
