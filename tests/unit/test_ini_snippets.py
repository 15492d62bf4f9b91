"""Every ini snippet the README shows, and every OpenStack file in deploy/,
loads as written with oslo.config: oslo's parser has no inline comments,
so `key = value   ; why` makes `; why` part of the value."""

import pathlib
import re

import pytest
from oslo_config import cfg

ROOT = pathlib.Path(__file__).resolve().parents[2]
SNIPPETS = re.findall(r"```ini\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
FILES = sorted((ROOT / "deploy" / "openstack").glob("*.conf"))


def _parsed(text, tmp_path):
    path = tmp_path / "snippet.conf"
    path.write_text(text)
    sections = {}
    cfg.ConfigParser(str(path), sections).parse()
    return path, sections


def _check_values(sections):
    for section, values in sections.items():
        for key, lines in values.items():
            for value in lines:
                assert not re.search(r"\s[;#]", value), \
                    f"[{section}] {key} = {value!r}: an inline comment is part of the value"


@pytest.mark.parametrize("text", SNIPPETS, ids=lambda t: t.split("\n", 1)[0])
def test_readme_ini_snippets_load_as_written(text, tmp_path):
    path, sections = _parsed(text, tmp_path)
    _check_values(sections)
    if "compute_driver" in sections.get("evrouter", {}):
        # nova.conf: Nova's own option types for [evrouter]
        from compute import nova_driver
        conf = cfg.ConfigOpts()
        conf.register_opts(nova_driver.OPTS, group="evrouter")
        conf(args=[], default_config_files=[str(path)])
        assert conf.evrouter.ssl is True and conf.evrouter.ssl_login == "external"
        assert "@" not in conf.evrouter.transport_url, "no password on a compute host"


def test_readme_shows_the_nova_and_neutron_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_deploy_openstack_files_load_as_written(path):
    sections = {}
    cfg.ConfigParser(str(path), sections).parse()
    _check_values(sections)
