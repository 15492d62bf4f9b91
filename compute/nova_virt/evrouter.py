"""Installed as ``nova.virt.evrouter``: Nova resolves [DEFAULT] compute_driver
under ``nova.virt`` only. Not a package of evrouter (no __init__): see
compute/nova_driver.py."""

from compute.nova_driver import EvrouterComputeDriver

__all__ = ["EvrouterComputeDriver"]
