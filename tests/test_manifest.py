"""Agent and manifest definitions: valid files load; every mistake names file, line and field."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyagent.errors import ConfigError
from pyagent.fleet.agent import load_agents
from pyagent.fleet.manifest import LoopSpec, load_manifest
from pyagent.fleet.templates import TemplateEnvironment, Templates
from pyagent.fleet.tools.registry import TOOLS as REGISTERED

AGENTS = """\
agents:
  - name: coder
    role: You fix bugs.
    tools: [read_file, write_file]
    permissions: {paths: ["src/**"]}
  - name: tester
    role: You run the tests.
    tools: [run_tests]
    limits: {max_tokens: 128, max_tool_calls: 2}
  - name: auditor
    role: You review changes.
    tools: [lint]
"""

MANIFEST = """\
name: code-test-audit
agents: agents.yaml
steps:
  - id: fix
    loop:
      max_iterations: 3
      until: "steps.test.data.failed == 0"
      steps:
        - id: code
          agent: coder
          instruction: "Fix: {{ task }} (try {{ loop.iteration }}) {{ steps.test.output }}"
        - id: test
          agent: tester
          instruction: Run the tests.
          retries: 1
  - id: audit
    agent: auditor
    when: "steps.test.data.failed == 0"
    instruction: "Review. Tests said: {{ steps.test.output }}"
    timeout_s: 120
goal:
  description: The tests pass.
  checks:
    - tool: run_tests
      expect: "data.failed == 0"
"""
EXAMPLES = Path(__file__).parents[1] / "examples"
TOOLS = set(REGISTERED)


def write(tmp_path, manifest=MANIFEST, agents=AGENTS):
    (tmp_path / "agents.yaml").write_text(agents)
    path = tmp_path / "manifest.yaml"
    path.write_text(textwrap.dedent(manifest))
    return path


def test_a_valid_manifest_loads(tmp_path):
    manifest = load_manifest(write(tmp_path), TOOLS)
    assert manifest.name == "code-test-audit"
    assert manifest.step_ids() == ["code", "test", "audit"]
    assert isinstance(manifest.steps[0], LoopSpec) and manifest.steps[0].loop.max_iterations == 3
    assert manifest.agents["tester"].limits.max_tool_calls == 2
    assert manifest.agents["coder"].permissions.paths == ["src/**"]


def test_templates_render_strictly():
    env = TemplateEnvironment()
    text = env.render("Fix {{ task }} after {{ steps.code.output }}",
                      task="bug", steps={"code": {"output": "done"}})
    assert text == "Fix bug after done"
    assert env.compile_expression("steps.test.data.failed == 0")(
        steps={"test": {"data": {"failed": 0}}}) is True


def error_for(tmp_path, manifest=MANIFEST, agents=AGENTS):
    with pytest.raises(ConfigError) as info:
        load_manifest(write(tmp_path, manifest, agents), TOOLS)
    return str(info.value)


def test_malformed_yaml_names_the_line(tmp_path):
    message = error_for(tmp_path, MANIFEST.replace("  - id: audit", "  - id: [audit"))
    assert "manifest.yaml:17" in message and "not valid YAML" in message


def test_a_missing_field_names_line_and_field(tmp_path):
    message = error_for(tmp_path, MANIFEST.replace("    agent: auditor\n", ""))
    assert "manifest.yaml:16: steps.1.agent: Field required" in message


def test_an_unknown_agent_names_its_line(tmp_path):
    message = error_for(tmp_path, MANIFEST.replace("agent: auditor", "agent: reviewer"))
    assert "manifest.yaml:17: unknown agent 'reviewer'" in message


def test_a_template_naming_a_later_step_is_refused(tmp_path):
    broken = MANIFEST.replace("Run the tests.", "Run the tests after {{ steps.audit.output }}")
    message = error_for(tmp_path, broken)
    assert "manifest.yaml:14" in message and "step 'audit', which does not run before it" in message


def test_unknown_names_and_bad_syntax_in_templates(tmp_path):
    assert "unknown names ['tsak']" in error_for(tmp_path, MANIFEST.replace("{{ task }}",
                                                                             "{{ tsak }}"))
    assert "invalid template" in error_for(tmp_path, MANIFEST.replace("{{ task }}", "{{ task"))
    assert "manifest.yaml:7: steps.0.loop.until: invalid template" in error_for(
        tmp_path, MANIFEST.replace('"steps.test.data.failed == 0"\n      steps',
                                   '"steps.test.data.failed =="\n      steps'))


def test_duplicate_step_ids_are_refused(tmp_path):
    message = error_for(tmp_path, MANIFEST.replace("id: audit", "id: code"))
    assert "step id 'code' is used twice" in message


def test_limits_are_checked(tmp_path):
    message = error_for(tmp_path, MANIFEST.replace("max_iterations: 3", "max_iterations: 0"))
    assert "manifest.yaml:6: steps.0.loop.max_iterations" in message
    message = error_for(tmp_path, MANIFEST.replace("retries: 1", "retries: -1"))
    assert "retries" in message


def test_agent_mistakes_name_the_agents_file(tmp_path):
    message = error_for(tmp_path, agents=AGENTS.replace("tools: [lint]", "tools: [lintt]"))
    assert "agents.yaml:12: agents.2.tools.0: unknown tool 'lintt'" in message
    message = error_for(tmp_path, agents=AGENTS.replace("name: auditor", "name: coder"))
    assert "agents.yaml:10" in message and "defined twice" in message
    message = error_for(tmp_path, agents=AGENTS.replace('paths: ["src/**"]', 'paths: ["../x"]'))
    assert "agents.yaml:5" in message and "inside the workspace" in message
    message = error_for(tmp_path, agents=AGENTS.replace("tools: [lint]",
                                                        "tools: [lint]\n    subagents: [revieww]"))
    assert "agents.yaml:13: agents.2.subagents.0: unknown agent 'revieww'" in message


def test_a_missing_agents_file_is_named(tmp_path):
    path = write(tmp_path)
    (tmp_path / "agents.yaml").unlink()
    with pytest.raises(ConfigError, match="manifest.yaml:2: agents: no agents file"):
        load_manifest(path, TOOLS)


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "agents.yaml").write_text("")
    with pytest.raises(ConfigError, match="agents.yaml: the file is empty"):
        load_agents(tmp_path / "agents.yaml")


@pytest.mark.parametrize(("example", "steps"), [
    ("bugfix", ["code", "test", "audit"]), ("docstrings", ["read", "document", "review"]),
    ("triage", ["test", "diagnose", "report"])])
def test_each_example_is_valid_and_starts_unsolved(example, steps, tmp_path):
    folder = EXAMPLES / example
    manifest = load_manifest(folder / "manifest.yaml", TOOLS)
    assert manifest.step_ids() == steps
    shutil.copytree(folder / "project", tmp_path / "project")
    check = subprocess.run([sys.executable, str(folder / "check.py"), str(tmp_path / "project")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode != 0  # the task is real: its own check fails before any agent runs


def test_the_goal_is_required_and_checked(tmp_path):
    no_goal = MANIFEST[:MANIFEST.index("goal:")]
    assert "goal: Field required" in error_for(tmp_path, no_goal)
    message = error_for(tmp_path, MANIFEST.replace("- tool: run_tests", "- tool: run_testz"))
    assert "manifest.yaml:24: goal.checks.0.tool: unknown tool 'run_testz'" in message
    message = error_for(tmp_path, MANIFEST.replace('expect: "data.failed == 0"',
                                                   'expect: "steps.test.data.failed == 0"'))
    assert "manifest.yaml:25: goal.checks.0.expect: unknown names ['steps']" in message
    check = '- tool: run_tests\n      expect: "data.failed == 0"'
    message = error_for(tmp_path, MANIFEST.replace(check,
                                                   "- {tool: read_file, arguments: {bogus: 1}}"))
    assert "manifest.yaml:24: goal.checks.0.arguments.path: Field required" in message
    message = error_for(tmp_path, MANIFEST.replace(
        check, "- {tool: shell, arguments: {argv: [no-such-program-x]}}"))
    assert ("manifest.yaml:24: goal.checks.0.arguments.argv.0: program 'no-such-program-x' is "
            "not on PATH") in message
    for bad, expected in (
            ("{tool: write_file, arguments: {path: x, content: y}}", "may not write to it"),
            ("{tool: read_file, arguments: {path: ../../etc/passwd}}",
             "arguments.path: '../../etc/passwd' must stay inside the workspace")):
        assert expected in error_for(tmp_path, MANIFEST.replace(check, "- " + bad))
    scripted = MANIFEST.replace(check, "- {tool: shell, arguments: {argv: [./check.sh]}}")
    assert load_manifest(write(tmp_path, scripted), TOOLS).goal.checks[0].tool == "shell"
    goal = load_manifest(write(tmp_path), TOOLS).goal
    assert goal.description == "The tests pass." and goal.checks[0].tool == "run_tests"


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("a: &x\n  b: *x\n", "broken.yaml:1: an alias refers to a node that contains it"),
    ("name: a\nagents: b\nname: c\n", "broken.yaml:3: duplicate key 'name' (first at line 1)"),
    ('name: x\nagents: "a.yaml\nsteps: []\n', "broken.yaml:2: not valid YAML"),
    ("? [a, b]\n: 1\n", "broken.yaml:1: a key must be a plain value"),
    ("x: \"\\ud800\"\nname: [\n", "broken.yaml:2: not valid YAML"),
    ("a: &a [1]\nb: {<<: *a}\n", "broken.yaml:2: `<<` merges mappings (or a list of them) only"),
    ("a: 1\nb:\n  c: " + "[" * 400 + "]" * 400 + "\n", "broken.yaml:3: nested too deeply"),
    ("a: 1\nretries: !!int abc\n", "broken.yaml:2: cannot read tag:yaml.org,2002:int value"),
    ("i: !!python/name:os.system x\n", "broken.yaml:1: cannot read tag:yaml.org,2002:python"),
    ("a: 1\nb: \"x\x7fy\"\n", "broken.yaml:2: not valid YAML: special characters are not "
                              "allowed character 0x7f"),
    ("a: " + "{b: " * 150 + "1" + "}" * 150 + "\n", "broken.yaml:1: nested too deeply"),
])
def test_hostile_yaml_is_one_clear_error(tmp_path, yaml_text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_manifest(path, TOOLS)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_billion_laughs_is_refused_quickly(tmp_path):
    rows = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match="laughs.yaml:.*expands to more than 100000 values"):
        load_manifest(path, TOOLS)


def test_templates_cannot_reach_internals_at_load_time(tmp_path):
    message = error_for(tmp_path, MANIFEST.replace("{{ task }}", "{{ ''.__class__.__mro__ }}"))
    assert "manifest.yaml:11: steps.0.loop.steps.0.instruction: refers to '__mro__'" in message
    message = error_for(tmp_path, MANIFEST.replace("{{ task }}", "{{ task['_x'] }}"))
    assert "refers to '_x'" in message


@pytest.mark.parametrize("template", [
    "{{ 'a' * 10**10 }}", "{{ [1] * 10**9 }}", "{{ 'x'.center(10**9) }}",
    "{{ 'x'|center(10**9) }}", "{{ '%09999999999d' % 1 }}", "{{ '{:>9999999999}'.format(1) }}",
    "{{ '%*d' % (999999999, 1) }}", "{{ 9 ** 999999999 }}",
    "{% for i in range(99999) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}",
    "{% set a = 'x' * 999999 %}{{ (a + a)|length }}", "{% set a = 'x' * 999999 %}{{ a ~ a }}",
    "{% set a = 'x' * 999999 %}{{ [a, a]|join }}", "{{ ('x' * 999999)|replace('x', 'xx') }}",
    "{{ ''.join(['x' * 999999] * 3) }}", "{{ ('x' * 999999).replace('x', 'xx') }}",
    "{{ (range(99999)|map('center', 999999)|list)|length }}",
    "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
    "{{ steps.code.update({'status': 'ok'}) }}", "{{ [[1] * 999999] * 999999 }}",
    "{{ ('a' * 999999).translate({97: 'b' * 999999}) }}",
    "{{ ('%(a)s' * 166666) % {'a': 'x' * 9999} }}",
    "{{ ('\n' * 99999)|indent('x' * 99999, blank=True) }}"])
def test_template_sizes_are_bounded(template):
    with pytest.raises(ConfigError, match=r"^m.yaml:3: steps.0.instruction: cannot render: "
                                          r"SecurityError"):
        Templates().render(template, "m.yaml:3: steps.0.instruction", task="t",
                           steps={"code": {"status": "error"}})


def test_render_failures_name_the_field():
    templates = Templates()
    with pytest.raises(ConfigError, match=r"m.yaml:9: goal: cannot render: UndefinedError: "
                                          r"'dict object' has no attribute 'nokey'"):
        templates.render("{{ steps.code.data.nokey }}", "m.yaml:9: goal",
                         steps={"code": {"data": {}}})
    with pytest.raises(ConfigError, match="m.yaml:4: until: cannot evaluate"):
        templates.holds("steps.x.data.failed == 0", "m.yaml:4: until", steps={})
    assert templates.render("{{ 'ab' * 3 }} {{ '%d' % 4 }} {{ 2 ** 10 }}", "w") == "ababab 4 1024"


def test_merge_keys_merge_and_written_keys_win(tmp_path):
    agents = tmp_path / "agents.yaml"
    agents.write_text("agents:\n  - &base {name: coder, role: You fix bugs., tools: [read_file]}\n"
                      "  - {<<: *base, name: tester, tools: [run_tests]}\n")
    loaded = load_agents(agents, TOOLS)
    assert loaded["tester"].role == "You fix bugs." and loaded["tester"].tools == ["run_tests"]


def test_files_that_are_too_big_or_not_utf8_are_one_line(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"name: x\nagents: a.yaml\ndescription: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"m.yaml:3: not UTF-8 text: invalid start byte "
                                          r"\(byte 0xff\)"):
        load_manifest(path, TOOLS)
    path.write_text("name: x\ndescription: " + "x" * 5_000_000 + "\n")
    with pytest.raises(ConfigError, match=r"m.yaml: 5,000,022 bytes; a definition file may have "
                                          r"at most 4,194,304"):
        load_manifest(path, TOOLS)


def test_a_demonstration_may_only_call_the_agents_own_tools(tmp_path):
    demo = ('    demonstrations:\n      - task: Fix it.\n        steps:\n'
            '          - {call: read_file, arguments: {path: src/a.py}, result: "x = 1"}\n'
            '          - {call: run_tests, result: "1 passed"}\n')
    message = error_for(tmp_path, agents=AGENTS.replace('    permissions: {paths: ["src/**"]}\n',
                                                        '    permissions: {paths: ["src/**"]}\n'
                                                        + demo))
    assert ("agents.yaml:10: agents.0.demonstrations.0.steps.1.call: 'run_tests' is not one of "
            "the agent's tools (read_file, write_file)") in message
    message = error_for(tmp_path, agents=AGENTS.replace(
        '    permissions: {paths: ["src/**"]}\n',
        '    permissions: {paths: ["src/**"]}\n    demonstrations: [{task: ""}]\n'))
    assert "agents.yaml:6" in message and "demonstrations.0.task" in message



def test_a_procedure_may_only_name_the_agents_own_tools(tmp_path):
    message = error_for(tmp_path, agents=AGENTS.replace(
        '    permissions: {paths: ["src/**"]}\n',
        '    permissions: {paths: ["src/**"]}\n    procedure: [read_file, lint]\n'))
    assert ("agents.yaml:6: agents.0.procedure.1: 'lint' is not one of the agent's tools "
            "(read_file, write_file)") in message

ROUTED = MANIFEST.replace(
    "          agent: coder\n",
    "          agent: coder\n          routes:\n"
    "            - {agent: auditor, when: \"'lint' in task\"}\n"
    "            - {agent: tester}\n")


def test_routes_name_known_agents_and_decide_on_the_task_alone(tmp_path):
    manifest = load_manifest(write(tmp_path, ROUTED), TOOLS)
    code = manifest.steps[0].loop.steps[0]
    assert [(r.agent, r.when) for r in code.routes] == [("auditor", "'lint' in task"),
                                                        ("tester", None)]
    message = error_for(tmp_path, ROUTED.replace("{agent: tester}", "{agent: nobody}"))
    assert ("manifest.yaml:13: steps.0.loop.steps.0.routes.1.agent: unknown agent 'nobody'"
            in message)
    message = error_for(tmp_path, ROUTED.replace("'lint' in task", "steps.test.output"))
    assert "routes.0.when: unknown names ['steps']; use task" in message
    narrowed = ROUTED.replace("          routes:",
                              "          tools: [read_file]\n          routes:")
    message = error_for(tmp_path, narrowed)
    assert "step 'code' may use only tools of its agent 'auditor'" in message
