"""Every ini block of README.md loads, as written, the way the service reads it.

The failure class: a snippet people copy that the service reads differently
from what the page shows. oslo.config has no inline comments, so
``spool_path = /x   ; one file per worker`` puts the comment into the path,
and into a driver or plugin name nova-compute and neutron-server then fail to
load. Each block names its file on its first line (``# nova.conf ...``,
``# neutron.conf ...``, ``# evrouter.conf``); it is loaded with oslo.config
against the options evrouter registers in that service (its own list_opts),
options of groups evrouter does not own as plain strings. It fails on:
- a value that carries a comment (``;`` or ``#`` after whitespace), or any
  value its option's type refuses;
- an option evrouter does not define in a group evrouter owns.
"""

import pathlib
import re

import pytest
from oslo_config import cfg

from compute import agent_main, nova_driver
from network import adapter_cmd, neutron_options
from router import main as router_main
from router import options as bus_options
from router import rest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The file a block is for -> the options evrouter registers in it.
TARGETS = {
    "nova.conf": [nova_driver.list_opts],
    "neutron.conf": [neutron_options.list_opts],
    "evrouter.conf": [bus_options.list_opts, router_main.list_opts,
                      rest.list_opts, agent_main.list_opts, adapter_cmd.list_opts],
}
COMMENT_AFTER_VALUE = re.compile(r"\s[;#]")


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```ini\n(.*?)^```", text, re.S | re.M)


def _target(block):
    first = block.splitlines()[0]
    for name in TARGETS:
        if first.startswith("#") and name in first:
            return name
    raise AssertionError(f"an ini block must name its file on its first line "
                         f"({', '.join(TARGETS)}), not {first!r}")


def _sections(path):
    sections = {}
    cfg.ConfigParser(str(path), sections).parse()
    return sections


def load(block, tmp_path):
    """(ConfigOpts with every option of the block registered, problems)."""
    path = tmp_path / "snippet.conf"
    path.write_text(block)
    conf = cfg.ConfigOpts()
    owned = {}
    for list_opts in TARGETS[_target(block)]:
        for group, opts in list_opts():
            for opt in opts:
                if opt.dest not in owned.setdefault(group, set()):
                    conf.register_opt(opt, group=None if group == "DEFAULT" else group)
                    owned[group].add(opt.dest)
    # [DEFAULT] is everybody's: only evrouter's own groups are checked.
    owned.pop("DEFAULT", None)
    problems = []
    for section, values in _sections(path).items():
        for key in values:
            dest = key.replace("-", "_")
            if section in owned:
                if dest not in owned[section]:
                    problems.append(f"[{section}] {key}: evrouter defines no such option")
                continue
            group = None if section == "DEFAULT" else section
            try:
                conf.register_opt(cfg.StrOpt(dest), group=group)
            except cfg.DuplicateOptError:
                pass        # one of evrouter's [DEFAULT] options
    conf(args=[], default_config_files=[str(path)], project="evrouter-readme")
    for section, values in _sections(path).items():
        group = conf if section == "DEFAULT" else conf[section]
        for key in values:
            dest = key.replace("-", "_")
            if section in owned and dest not in owned[section]:
                continue        # reported above
            try:
                value = getattr(group, dest)
            except (cfg.NoSuchOptError, cfg.ConfigFileValueError) as e:
                problems.append(f"[{section}] {key}: {e}")
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and COMMENT_AFTER_VALUE.search(item):
                    problems.append(
                        f"[{section}] {key} = {item!r}: oslo.config has no "
                        f"inline comments, the comment is part of the value")
    return conf, problems


def test_the_readme_has_its_snippets():
    targets = [_target(b) for b in readme_blocks()]
    assert {"nova.conf", "neutron.conf"} <= set(targets), targets


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_ini_block_loads_as_written(index, tmp_path):
    block = readme_blocks()[index]
    _, problems = load(block, tmp_path)
    assert not problems, f"README ini block {index + 1}:\n" + "\n".join(problems)


# The checker itself: what it must refuse.
def test_an_inline_comment_is_refused(tmp_path):
    _, problems = load("# neutron.conf\n[evrouter]\n"
                       "spool_path = /var/lib/x   ; one per worker\n", tmp_path)
    assert len(problems) == 1 and "inline comments" in problems[0]


def test_an_inline_comment_on_a_typed_option_is_refused(tmp_path):
    _, problems = load("# nova.conf\n[evrouter]\nhold_seconds = 300 # seconds\n",
                       tmp_path)
    assert len(problems) == 1 and "hold_seconds" in problems[0]


def test_an_inline_comment_in_a_foreign_group_is_refused(tmp_path):
    _, problems = load("# nova.conf\n[DEFAULT]\ncompute_driver = "
                       "evrouter.EvrouterComputeDriver  ; ours\n", tmp_path)
    assert len(problems) == 1 and "compute_driver" in problems[0]


def test_an_option_evrouter_does_not_define_is_refused(tmp_path):
    _, problems = load("# neutron.conf\n[evrouter]\nspool = /x\n", tmp_path)
    assert problems == ["[evrouter] spool: evrouter defines no such option"]


def test_an_option_of_another_service_is_refused(tmp_path):
    # [evrouter] of nova.conf is not [evrouter] of neutron.conf.
    _, problems = load("# nova.conf\n[evrouter]\nspool_path = /x\n", tmp_path)
    assert problems == ["[evrouter] spool_path: evrouter defines no such option"]


def test_a_block_that_names_no_file_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="must name its file"):
        load("[DEFAULT]\ndebug = true\n", tmp_path)


def test_values_are_read_as_the_service_reads_them(tmp_path):
    conf, problems = load("# nova.conf\n[DEFAULT]\ncompute_driver = "
                          "evrouter.EvrouterComputeDriver\n[evrouter]\n"
                          "hold_seconds = 300\n", tmp_path)
    assert not problems
    assert conf.compute_driver == "evrouter.EvrouterComputeDriver"
    assert conf.evrouter.hold_seconds == 300.0
