"""scripts/reading_path.py: the lines a reader follows from a method file into common.py."""
from scripts import reading_path

COMMON = '''import math

A = 1


def helper():
    return A


# === internals: nothing below is called by a method script ===
def first():
    return helper()


def unused():
    return 0


def second():
    return math.pi
'''

METHOD = '''import common


def f():
    return common.second() + common.first()
'''


def test_counts_lines_definitions_and_jumps(tmp_path):
    (tmp_path / "common.py").write_text(COMMON)
    (tmp_path / "m.py").write_text(METHOD)
    got = reading_path.count(tmp_path / "m.py", tmp_path / "common.py")
    # second (2 lines), first (2), helper (2), A (1); unused is never reached
    assert got["common_lines"] == 7 and got["definitions"] == 4
    assert got["total_lines"] == 5 + 7 and got["direct_names"] == 2
    assert got["path"] == [19, 11] and got["jumps"] == 1 and got["backward_jumps"] == 1
    assert got["common_lines_above_internals"] == 3   # helper and A
