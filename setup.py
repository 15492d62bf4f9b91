from setuptools import find_packages, setup

setup(
    name="evrouter",
    version="0.1.0",
    description="Message-bus event router for OpenStack compute: port-status "
                "and hypervisor lifecycle events over RabbitMQ.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["router", "router.*", "compute",
                                    "compute.*", "network", "network.*"]),
    package_data={"router.bus": ["schema/*.json"]},
    # nova-compute loads [DEFAULT] compute_driver under nova.virt only: one
    # module there, nova.virt.evrouter (see compute/nova_driver.py).
    package_dir={"nova.virt": "compute/nova_virt"},
    py_modules=["nova.virt.evrouter"],
    install_requires=[
        "kombu>=5.3",
        "amqp>=5.2",
        "oslo.messaging>=14.0",
        "oslo.config>=9.0",
        "oslo.log>=5.0",
        "libvirt-python>=9.0",
        "eventlet>=0.33",
        "prometheus-client>=0.17",
        "oslo.utils>=6.0",
        # the journal's batches (router/journal.py)
        "msgpack>=1.0",
    ],
    extras_require={
        # ORM hooks for a network service with its own SQLAlchemy port table
        "orm": ["SQLAlchemy>=1.4"],
        # Keystone authentication of the router's REST compatibility endpoint
        "keystone": ["keystonemiddleware>=10.0", "oslo.policy>=4.0"],
        # [journal] otlp_endpoint: each hop as an OpenTelemetry span over
        # OTLP/HTTP (router/journal_otlp.py); not imported when it is empty
        "otlp": ["opentelemetry-sdk>=1.45.2,<2",
                 "opentelemetry-exporter-otlp-proto-http>=1.45.2,<2"],
        # python -m tests.fuzz: coverage-guided fuzzing, outside the test run
        "fuzz": ["atheris>=2.3"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "hypothesis>=6.80",
                 "jsonschema>=4.17", "ruff>=0.4", "SQLAlchemy>=1.4", "PyYAML>=6.0"],
    },
    entry_points={
        "console_scripts": ["evrouter = router.cli:main"],
        "oslo.config.opts": ["evrouter.bus = router.options:list_opts",
                             "evrouter.router = router.main:list_opts",
                             "evrouter.agent = compute.agent_main:list_opts",
                             "evrouter.network = network.adapter_cmd:list_opts"],
        "neutron.service_plugins": [
            "evrouter = network.neutron_plugin:EvrouterNotifierPlugin"],
    },
)
