"""`evrouter`: one console script, a subcommand per service and tool."""

import importlib
import sys

# subcommand -> (module, one-line help); modules are imported on use so that
# `evrouter publish` does not pay for libvirt or eventlet.
COMMANDS = {
    "demo": ("router.demo", "run the whole story in one process and show its timeline"),
    "router": ("router.main", "run the router service"),
    "topology": ("router.topology_cmd", "show or declare the bus topology"),
    "permissions": ("router.permissions_cmd",
                    "print or apply the broker users and permissions"),
    "agent": ("compute.agent_main", "run the libvirt lifecycle agent of a compute host"),
    "publish": ("network.publish_cmd", "publish one instance event"),
    "network-adapter": ("network.adapter_cmd",
                        "turn network service notifications into events"),
}


def usage():
    width = max(map(len, COMMANDS))
    lines = ["usage: evrouter COMMAND [options]   (evrouter COMMAND --help)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"evrouter: unknown command {command!r}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
