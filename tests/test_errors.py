import pytest
import trio

import peerflow
from peerflow import errors


def test_every_error_derives_from_the_root() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), peerflow.PeerflowError), name


def test_peer_ref_not_found_is_also_a_local_ref_not_found() -> None:
    err = peerflow.PeerRefNotFoundError("abc")
    assert isinstance(err, peerflow.PeerError)
    assert isinstance(err, peerflow.RefNotFoundError)
    assert isinstance(err, LookupError)
    assert err.ref_uuid == "abc"


def test_errors_carry_their_data() -> None:
    err = peerflow.PeerEnvelopeVersionError(got=3, supported=1)
    assert (err.got, err.supported) == (3, 1)
    assert "3" in str(err)
    cause = ValueError("boom")
    step = peerflow.StepError("s1", cause)
    assert step.step_id == "s1"
    assert step.__cause__ is cause
    enc = peerflow.PeerEncodeError("int out of range", 'input["a"][3]')
    assert enc.path == 'input["a"][3]'
    assert str(enc).startswith('input["a"][3]')


def test_public_objects_report_the_public_module() -> None:
    assert peerflow.RemoteRefDescriptor.__module__ == "peerflow"
    assert peerflow.PeerError.__module__ == "peerflow"


async def test_trio_mode_is_on() -> None:
    with trio.fail_after(1):
        await trio.lowlevel.checkpoint()


def test_remote_workflow_error_message() -> None:
    err = peerflow.PeerWorkflowError("bad", step_id="s", error_type="KeyError")
    assert err.step_id == "s"
    assert err.error_type == "KeyError"
    assert "bad" in str(err)
    with pytest.raises(peerflow.PeerError):
        raise err
