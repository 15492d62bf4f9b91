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


def neutron_bus_notifier_conf():
    return _read("neutron-bus-notifier.conf")


def nova_compute_conf():
    return _read("nova-compute.conf")


def neutron_service_plugin_name():
    plugins = [p.strip() for p in
               neutron_conf()["DEFAULT"]["service_plugins"].split(",")]
    assert "evrouter" in plugins, plugins
    return "evrouter"


def load_with_oslo(name, opts, group="evrouter"):
    """The file as the service would load it: oslo.config with the group's
    real options registered (a value it cannot parse, or an inline comment
    glued to a value, fails here)."""
    from oslo_config import cfg
    conf = cfg.ConfigOpts()
    conf.register_opts(opts, group=group)
    conf(args=[], default_config_files=[str(DEPLOY / name)])
    return conf[group]
