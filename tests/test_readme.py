"""The README's code blocks run as written and its test command is the one CI runs."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.rst"


def usage_examples():
    """The literal blocks that follow "runs it)::", dedented, in README order."""
    blocks = re.findall(r"runs it\)::\n\n((?:    .*\n|\n)+)", README.read_text())
    return ["\n".join(line[4:] for line in block.splitlines()) for block in blocks]


def run_example(source):
    """Execute one README block; return its namespace and the numbers of its printed lines."""
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, str(README), "exec"), namespace)
    return namespace, printed.getvalue().splitlines()


def test_readme_has_the_mkf_and_the_kdatff_example():
    examples = usage_examples()
    assert len(examples) == 2, "README.rst lost a usage example"
    assert "KnowledgeBank" in examples[0] and "MultiBranchResNet" in examples[1]


def test_readme_mkf_example_trains_and_fills_the_bank():
    namespace, lines = run_example(usage_examples()[0])
    pattern = r"step +(\d+)  (none|mixup|cutmix) +ce (\d+\.\d+)  kd (\d+\.\d+)"
    steps = [re.fullmatch(pattern, line) for line in lines]
    assert len(steps) == 12 and all(steps), lines
    ce, kd = ([float(step.group(i)) for step in steps] for i in (3, 4))
    assert sum(ce[-4:]) < sum(ce[:4]), ce  # it learns
    assert kd[0] == 0.0 and max(kd[1:]) > 0.0, kd  # no knowledge before the first write
    assert bool(namespace["bank"].seen.all())  # every image's knowledge was written


def test_readme_kdatff_example_trains_with_the_attention_ramp():
    _, lines = run_example(usage_examples()[1])
    pattern = (r"step (\d)  loss (\d+\.\d+)  branch CE (\d+\.\d+) (\d+\.\d+)  "
               r"attention (\d+\.\d+)")
    steps = [re.fullmatch(pattern, line) for line in lines]
    assert len(steps) == 8 and all(steps), lines
    losses = [float(step.group(2)) for step in steps]
    attention = [float(step.group(5)) for step in steps]
    assert losses[-1] < losses[0], losses
    # The ramp starts at 0; each backward advances it, so the term counts from the next step on.
    assert attention[0] == 0.0 and min(attention[1:]) > 0.0, attention


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"The tests[^:]*::\n\n    (.+)\n", README.read_text()).group(1)
    assert command in ci.splitlines()
