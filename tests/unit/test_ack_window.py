"""The ack window against a model of the broker's side of a channel.

A stateful property test: deliveries come, settle in any order, some stay
unsettled for a long time (a copy held in hand); time passes; flush() is
called now and then, and its frames are applied to a model channel that
behaves as RabbitMQ does (a multiple-ack covers every outstanding tag up to
its own; a tag not outstanding is a channel error). The invariants:

- every frame is one the broker accepts (no tag acknowledged twice, none
  unknown), and a multiple-ack never covers a delivery not yet settled;
- each delivery is acknowledged or rejected exactly as it was settled;
- nothing settled waits behind a head older than `stuck`: after a flush,
  if the oldest outstanding delivery came `stuck` ago or earlier, nothing
  settled is left unsent (the prefetch window is not held by one delivery);
- len(window) is what the broker still counts against the prefetch.
"""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from router.acks import AckWindow

STUCK = 0.1


class BrokerChannel:
    def __init__(self):
        self.outstanding = set()
        self.outcome = {}

    def deliver(self, tag):
        self.outstanding.add(tag)

    def apply(self, frame, verdicts):
        kind, tag, flag = frame
        assert tag in self.outstanding, f"{frame}: tag not outstanding"
        if kind == "ack" and flag:
            covered = [t for t in self.outstanding if t <= tag]
        else:
            covered = [tag]
        for t in covered:
            assert t in verdicts, f"{frame} covers {t}, not settled yet"
            self.outstanding.discard(t)
            self.outcome[t] = "ack" if kind == "ack" else (
                "requeue" if flag else "drop")


class Window(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.window = AckWindow(stuck=STUCK, clock=lambda: self.now)
        self.broker = BrokerChannel()
        self.next_tag = 1
        self.verdicts = {}          # tag -> what it was settled as
        self.opened = {}

    @rule(n=st.integers(1, 5))
    def deliver(self, n):
        for _ in range(n):
            tag, self.next_tag = self.next_tag, self.next_tag + 1
            self.window.open(tag)
            self.broker.deliver(tag)
            self.opened[tag] = self.now

    @rule(data=st.data(), verdict=st.sampled_from(["ack", "requeue", "drop"]))
    def settle(self, data, verdict):
        open_ = sorted(t for t in self.opened if t not in self.verdicts)
        if not open_:
            return
        tag = data.draw(st.sampled_from(open_))
        self.verdicts[tag] = verdict
        self.window.settle(tag, verdict == "ack", requeue=verdict == "requeue")

    @rule(dt=st.sampled_from([0.0, 0.01, 0.05, 0.2, 2.0]))
    def time_passes(self, dt):
        self.now += dt

    @rule()
    def flush(self):
        for frame in self.window.flush():
            self.broker.apply(frame, self.verdicts)
        outstanding = self.broker.outstanding
        if outstanding and self.now - self.opened[min(outstanding)] >= STUCK:
            waiting = [t for t in outstanding if t in self.verdicts]
            assert not waiting, f"settled but held back: {waiting}"

    @invariant()
    def outcomes_are_the_verdicts(self):
        for tag, outcome in self.broker.outcome.items():
            assert outcome == self.verdicts[tag]

    @invariant()
    def length_is_what_the_broker_counts(self):
        assert len(self.window) == len(self.broker.outstanding)


Window.TestCase.settings = settings(max_examples=300, stateful_step_count=60,
                                    deadline=None)
test_ack_window_model = Window.TestCase


def test_a_held_head_holds_the_others_back_no_longer_than_stuck():
    now = [0.0]
    w = AckWindow(stuck=STUCK, clock=lambda: now[0])
    for tag in range(1, 5):
        w.open(tag)
    w.settle(2, True)
    w.settle(3, False)
    assert w.flush() == [], "a young head: the others wait, coalesced"
    now[0] = STUCK
    w.settle(4, True)
    assert w.flush() == [("ack", 2, False), ("reject", 3, True),
                         ("ack", 4, False)]
    assert len(w) == 1 and w.holds(1) and not w.holds(2)
    w.open(5)
    w.settle(5, True)
    w.settle(1, True)
    assert w.flush() == [("ack", 5, True)], "passes over what went out already"
    assert len(w) == 0
