"""Injected into a test server process (PYTHONPATH): SIGKILL itself at one point of a secure round.

FLORA_TEST_SECURE_KILL="<step>:<n>" names the point. ``advertise:<n>``: once the n-th
AdvertiseKeys is recorded and durable, before it is answered. ``<step>:0`` (share, mask1,
unmask1, mask2, unmask2): when that step is about to be handed out (what opens it is saved).
``<step>:<n>`` with n >= 1: once the n-th answer of that step is saved, before it is
acknowledged. Used by tests/test_secure_resume.py.
"""

import os
import signal

_POINT = os.environ.get("FLORA_TEST_SECURE_KILL")

if _POINT:
    import flora.server.secure_round as _secure
    import flora.server.servicer as _servicer

    _LABEL, _COUNT = _POINT.split(":")[0], int(_POINT.split(":")[1])
    _seen = {"answers": 0}

    def _count_and_kill() -> None:
        _seen["answers"] += 1
        if _seen["answers"] == _COUNT:
            os.kill(os.getpid(), signal.SIGKILL)

    _step = _secure.SecureRounds._step
    _answered = _secure.SecureRounds._answered
    _advertise = _servicer.CoordinatorServicer.AdvertiseKeys

    async def _killing_step(self, att, tasks, label):
        if label == _LABEL and _COUNT == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return await _step(self, att, tasks, label)

    async def _killing_answered(self, att, index, kind, size, commit):
        label = _secure._label(att.steps[index])  # before the answer takes the step away
        reply = await _answered(self, att, index, kind, size, commit)
        if label == _LABEL:
            _count_and_kill()
        return reply

    async def _killing_advertise(self, request, context):
        reply = await _advertise(self, request, context)
        if _LABEL == "advertise":
            _count_and_kill()
        return reply

    _secure.SecureRounds._step = _killing_step
    _secure.SecureRounds._answered = _killing_answered
    _servicer.CoordinatorServicer.AdvertiseKeys = _killing_advertise
