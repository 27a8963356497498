import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.rst"


def usage_example() -> str:
    text = README.read_text()
    match = re.search(r"runs it\)::\n\n((?:    .*\n|\n)+)", text)
    assert match, "README.rst lost its usage example"
    return "\n".join(line[4:] for line in match.group(1).splitlines())


def test_readme_usage_example_runs_as_written():
    namespace = {}
    exec(compile(usage_example(), str(README), "exec"), namespace)
    assert bool(namespace["bank"].seen.any())  # the loop really wrote knowledge


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"The tests::\n\n    (.+)\n", README.read_text()).group(1)
    assert command in ci.splitlines()
