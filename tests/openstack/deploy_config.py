"""The adoption guide's configuration files (deploy/openstack/), as tests read them."""

import configparser
import pathlib

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "openstack"


def _read(name):
    parser = configparser.ConfigParser(interpolation=None)
    with open(DEPLOY / name) as f:
        parser.read_file(f)
    return parser


def neutron_conf():
    return _read("neutron.conf")


def nova_compute_conf():
    return _read("nova-compute.conf")


def neutron_service_plugin_name():
    plugins = [p.strip() for p in
               neutron_conf()["DEFAULT"]["service_plugins"].split(",")]
    assert "evrouter" in plugins, plugins
    return "evrouter"
