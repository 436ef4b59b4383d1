"""The mutation check (tools/mutation_check.py): every planted bug is caught by the fast tests.

The fast tests here keep the list honest on every run (each mutation still applies to today's code,
a vanished text fails loudly, the README lists them all); the slow one plants each bug in a copy of
the tree and runs the targeted tests (about 3 minutes on 2 cores).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "mutation_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_every_mutation_applies_to_todays_code():
    mc = _module()
    mc.check_all()
    assert len(mc.MUTATIONS) >= 9


def test_vanished_text_fails_loudly():
    mc = _module()
    gone = mc.Mutation("gone", "-", "weights/configs/dit.py", (("no such text", "x"),), ("tests",))
    with pytest.raises(mc.MutationError, match="'no such text' not found in weights/configs/dit.py.*update this entry"):
        mc.mutate("some code", gone)
    twice = mc.Mutation("twice", "-", "f.py", (("a", "b"),), ("tests",))
    with pytest.raises(mc.MutationError, match="found 2 times"):
        mc.mutate("a a", twice)


def test_readme_lists_every_mutation():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [m.name for m in _module().MUTATIONS if f"`{m.name}`" not in readme]
    assert not missing, f"README does not list the mutations {missing}"


@pytest.mark.slow
def test_every_planted_bug_is_caught():
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    n = len(_module().MUTATIONS)
    assert f"{n}/{n} mutants killed" in proc.stdout
