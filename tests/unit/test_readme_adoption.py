"""The README's adoption guide says what the tested configuration files say.

tests/openstack runs the real Nova and Neutron with deploy/openstack/*.conf;
this keeps the snippets people copy from the README equal to those files
(every option the README sets is set there, to the same value, except the
broker URL, whose credentials the tests replace).
"""

import configparser
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _snippets():
    text = (ROOT / "README.md").read_text()
    guide = text[text.index("## Adopting evrouter in an OpenStack cloud"):]
    guide = guide[:guide.index("\n## ", 1)]
    return re.findall(r"```ini\n(.*?)```", guide, re.S)


def _parse(text):
    # No inline comments, as oslo.config reads it (test_readme_ini.py).
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


def test_every_readme_snippet_matches_a_tested_file():
    snippets = _snippets()
    assert len(snippets) == 3
    for snippet in snippets:
        # Each snippet names the tested file on its first line.
        name, = re.findall(r"deploy/openstack/(\S+\.conf)", snippet.splitlines()[0])
        ours = _parse(snippet)
        tested = _parse((ROOT / "deploy" / "openstack" / name).read_text())
        assert ours.defaults() and ours.defaults().items() <= tested.defaults().items()
        for section in ours.sections():
            for key, value in ours.items(section):
                assert tested.has_option(section, key), f"{name} [{section}] {key}"
                if key != "transport_url":
                    assert tested.get(section, key) == value, f"{name} [{section}] {key}"
