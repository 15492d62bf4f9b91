"""Coverage-guided fuzzing of the inbound decode (atheris; not a test).

    python -m tests.fuzz [-runs=1000000] [libFuzzer flags...]

One input is one AMQP message as it comes off the wire: two bytes giving
the length of a raw basic-properties header, that header, then the body.
The target is the whole path a consumer takes with it: py-amqp's property
decoding as evrouter's transport does it, inbound.decode_message, and
inbound.safe_headers fed back into py-amqp's encoder (what the dead-letter
step does). Any outcome but an Envelope or a ContractError is a crash;
libFuzzer stops and writes the input to crash-<sha1>. Keep every crasher
as a case in tests/unit/test_inbound.py.

The corpus is seeded from the poison suite's cases and valid envelopes.
"""

import os
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import amqp.serialization

    from router.bus import contract, inbound
    from router.bus.transport import _TotalMessage

_BASIC = 60     # AMQP class id of basic.* content headers


def one_message(data):
    """Split fuzz input into (raw properties, body)."""
    if len(data) < 2:
        return b"\x00\x00", data
    n = struct.unpack(">H", data[:2])[0]
    return data[2:2 + n], data[2 + n:]


def target(data):
    raw, body = one_message(data)
    message = _TotalMessage()
    message._load_properties(_BASIC, raw or b"\x00\x00", 0)
    props = message.properties
    try:
        inbound.decode_message(body, props)
    except contract.ContractError:
        pass
    headers = inbound.safe_headers(props.get("application_headers"))
    amqp.serialization.dumps("F", [headers])
    inbound.safe_shortstr(props.get("message_id"))
    inbound.loggable(props.get("message_id"))


def seeds():
    """Inputs built from the poison cases, and valid envelopes."""
    from tests.functional import poison

    out = []
    for _, body, props, raw, _ in poison.cases("cmp-seed"):
        if raw is None:
            raw = amqp.Message(b"", **props)._serialize_properties()
        out.append(struct.pack(">H", len(raw)) + raw + body[:4096])
    out.append(b"\x00\x02\x00\x00" + poison.event_body("cmp-seed"))
    return out


def main(argv):
    argv = list(argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="evrouter-fuzz-")
        for i, seed in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
        print(f"corpus: {corpus}", flush=True)
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
