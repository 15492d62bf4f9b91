"""`evrouter`: one console script, a subcommand per service and tool.

Every option is accepted with dashes or underscores after its ``--``:
oslo.config registers ``[bus] queue_type`` as ``--bus-queue_type`` and
``transport-url`` as ``--transport-url``; people type ``--bus-queue-type``
and ``--transport_url``. Each command builds its own parser (and oslo.log
adds options of its own), so the spelling is settled where the parser knows
every flag: while a command runs, oslo.config's parser rewrites each
``--flag`` that differs from a registered one only in ``-``/``_`` to the
registered spelling before parsing. Option definitions stay as they are, so
config files and the generated sample are unchanged.
"""

import contextlib
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
    "trace": ("router.trace_cmd",
              "every hop of an event, from the journal stream"),
    "stuck": ("router.stuck_cmd",
              "the waits that are stuck now, and why, from the journal"),
}


def usage():
    width = max(map(len, COMMANDS))
    lines = ["usage: evrouter COMMAND [options]   (evrouter COMMAND --help)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _spelling(flag):
    return flag.replace("_", "-")


def as_registered(argv, flags):
    """`argv` with every long option spelled as in `flags`. Pure.

    ``--a_b-c`` becomes the one registered flag that equals it once
    underscores count as dashes (``--a-b_c``); ``--flag=value`` too. Exact
    matches, unknown flags, ambiguous ones and everything after a lone
    ``--`` are left for the parser to accept or refuse.
    """
    registered = {}
    for flag in flags:
        if flag.startswith("--"):
            registered.setdefault(_spelling(flag), []).append(flag)
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            same = registered.get(_spelling(name), ())
            if name not in flags and len(same) == 1:
                arg = same[0] + eq + value
        out.append(arg)
    return out


@contextlib.contextmanager
def either_spelling():
    """While it lasts, oslo.config's parsers accept dashes or underscores."""
    from oslo_config import cfg

    # oslo.config adds the arguments lazily, in its parse_args; only then
    # does the parser know every flag (ours, oslo.log's, --config-file).
    parser_class = cfg._CachedArgumentParser
    original = parser_class.parse_args

    def parse_args(parser, args=None, namespace=None):
        parser.initialize_parser_arguments()
        if args is not None:
            args = as_registered(list(args), parser._option_string_actions)
        return original(parser, args, namespace)

    parser_class.parse_args = parse_args
    try:
        yield
    finally:
        parser_class.parse_args = original


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv:                # no command: a usage error, as argparse's
        print(usage(), file=sys.stderr)
        return 2
    command = argv[0]
    if command not in COMMANDS:
        print(f"evrouter: unknown command {command!r}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    with either_spelling():
        return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
