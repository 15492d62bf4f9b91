"""A TLS-enabled RabbitMQ node beside the main broker, for the `tls` tests.

The session fixture `tls_node` starts tls1@localhost (AMQPS on
127.0.0.1:5695, plain 5694 for nothing but set-up, distribution 25694) with
tests/tls/rabbitmq-tls.sh, which makes a throwaway CA and certificates with
openssl (about 10 s), and stops it (removing every key) at the end of the
session if it started it; `x509_node` does the same for tls-x509@localhost
(5723, plain 5722, distribution 25722), where every client must show a
certificate naming its user in a subjectAltName. The main broker on 5672 is
never touched. Nodes and deployments: tests/tls/nodes.py.

These tests run in the main pytest run: the node starts in about 10 s and
the tests take seconds. EVROUTER_TLS=0 skips them (no RabbitMQ, no openssl,
or no time); EVROUTER_TLS_KEEP=1 leaves the node running for the next run.
"""

import os
import shutil

import pytest

from tests.tls.nodes import (
    X509_DIR,
    X509_DIST_PORT,
    X509_NODE,
    X509_PLAIN_PORT,
    X509_PORT,
    TLSDeployment,
    TLSNode,
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EVROUTER_TLS") != "0":
        return
    skip = pytest.mark.skip(reason="EVROUTER_TLS=0")
    for item in items:
        if item.get_closest_marker("tls"):
            item.add_marker(skip)


def _needs_tools():
    for tool in ("rabbitmq-server", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="session")
def tls_node():
    """The TLS node of the main run: password users beside x509 hosts (CN)."""
    _needs_tools()
    node = TLSNode().start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def x509_node():
    """A second node where every client must show a certificate and users
    are named by subjectAltName (a deployment with no password at all)."""
    _needs_tools()
    node = TLSNode(X509_NODE, X509_PORT, X509_PLAIN_PORT, X509_DIST_PORT, X509_DIR,
                   strict=True).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def deployment(tls_node):
    """One deployment per module (rabbitmqctl takes a second a call), with
    x509 hosts a and b; `applied` is what `evrouter permissions` printed."""
    d = TLSDeployment(tls_node)
    d.applied = d.apply("a", "b")
    assert d.applied.returncode == 0, d.applied.stdout + d.applied.stderr
    try:
        yield d
    finally:
        if tls_node.kept:
            d.cleanup()
