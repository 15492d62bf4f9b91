"""The waiter's API read like Nova 34's ComputeVirtAPI.wait_for_instance_event."""

import uuid

import pytest

from compute import waiting
from compute.events import InstanceEvents
from router.bus.contract import FAILED, VIF_PLUGGED, InstanceEvent


class Instance:
    def __init__(self):
        self.uuid = str(uuid.uuid4())


def test_timeout_keyword_and_deadline_alias():
    registry = InstanceEvents()
    inst = Instance()
    for kwargs in ({"timeout": 0.01}, {"deadline": 0.01}):
        with pytest.raises(waiting.InstanceEventTimeout) as err:
            with registry.wait_for_instance_event(inst, [(VIF_PLUGGED, "p")],
                                                  **kwargs) as wait:
                assert wait.timeout == wait.deadline == 0.01
        assert err.value.timeout == err.value.deadline == 0.01


def test_timeout_positional_as_in_nova():
    registry = InstanceEvents()
    with pytest.raises(waiting.InstanceEventTimeout):
        with registry.wait_for_instance_event(Instance(), [(VIF_PLUGGED, "p")], 0.01):
            pass


def test_timeout_exception_carries_nova_kwargs():
    registry = InstanceEvents()
    with pytest.raises(waiting.InstanceEventTimeout) as err:
        with registry.wait_for_instance_event(Instance(), [(VIF_PLUGGED, "p")],
                                              timeout=0.01):
            pass
    exc = err.value
    assert exc.kwargs["event_names"] == [f"{VIF_PLUGGED}-p"]
    assert exc.kwargs["timeout"] == 0.01
    assert exc.msg_fmt % exc.kwargs   # formats as Nova's message does
    assert isinstance(exc, TimeoutError)


def test_error_callback_gets_the_name_tag_pair_and_the_instance():
    # Nova calls error_callback(event_name, instance) with event_name the
    # (name, tag) pair it was asked for; only an explicit False stops.
    registry = InstanceEvents()
    inst = Instance()
    seen = []

    def callback(event_name, instance):
        seen.append((event_name, instance))
        return False

    with registry.wait_for_instance_event(inst, [(VIF_PLUGGED, "p")], timeout=5,
                                          error_callback=callback):
        registry.deliver(InstanceEvent(VIF_PLUGGED, inst.uuid, "p", FAILED), "m")
    assert seen == [((VIF_PLUGGED, "p"), inst)]
