import pytest

from coordination.errors import InvalidPath
from coordination.paths import normalise_path, paths_overlap


class NormalisePathTests:
    @pytest.mark.parametrize(("raw", "expected"), [
        ("src/app.py", "src/app.py"),
        ("a/./b", "a/b"),
        ("a//b", "a/b"),
        ("./a/b", "a/b"),
        ("a/b/", "a/b/"),
        ("a/./b//", "a/b/"),
        ("./", "./"),
        ("docs", "docs"),
        ("name with spaces.md", "name with spaces.md"),
    ])
    def test_it_normalises(self, raw, expected):
        assert normalise_path(raw) == expected

    @pytest.mark.parametrize(("raw", "fragment"), [
        ("/etc/passwd", "absolute"),
        ("../x", "climbs out"),
        ("a/../../x", "climbs out"),
        ("a/../b", "climbs out"),
        ("", "empty"),
        ("   ", "empty"),
        ("a\x00b", "NUL"),
        ("a\\b", "'\\'"),
        ("x" * 1025, "at most 1024"),
        (".", "workspace itself"),
        (42, "must be a string"),
    ])
    def test_it_refuses(self, raw, fragment):
        with pytest.raises(InvalidPath) as info:
            normalise_path(raw)
        assert fragment in info.value.detail
        assert info.value.code == "invalid_path"


class OverlapTests:
    @pytest.mark.parametrize(("a", "b", "overlap"), [
        ("src/app.py", "src/app.py", True),
        ("src/", "src/app.py", True),
        ("src/app.py", "src/", True),
        ("src/", "src/lib/deep.py", True),
        ("src/", "srcfoo.py", False),
        ("src/", "src2/", False),
        ("src/a.py", "src/b.py", False),
        ("./", "anything/at/all", True),
        ("a/b/", "a/b", True),
        ("a/", "a/b/", True),
    ])
    def test_directory_covers_what_is_under_it(self, a, b, overlap):
        assert paths_overlap(a, b) is overlap
        assert paths_overlap(b, a) is overlap
