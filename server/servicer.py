"""The flora.v1 Coordinator service: translate each call to the coordinator and back.

Thin by design: a handler resolves the caller from its bearer token, calls one coordinator
method, and ``refusals`` maps every domain ``Refusal`` to its gRPC status, in this one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from flora.common.wire import Piece
from flora.server import errors, operators, round_settings
from flora.server.auth import bearer_token
from flora.server.coordinator import Coordinator
from flora.server.secure_round import SecureRounds
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import coordinator_pb2_grpc, secagg_pb2, transfer_pb2

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[errors.Refusal], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
}


def as_refusal(call: str, error: Exception) -> errors.Refusal:
    """Any failure inside a handler as the refusal a client gets; no exception text gets out.

    Running out of disk or file descriptors is logged as one clear line (the operator's cue);
    anything else unexpected is logged with its traceback and answered INTERNAL.
    """
    if isinstance(error, errors.Refusal):
        return error
    if (refusal := errors.resource_refusal(error)) is not None:
        log.error("%s failed: %s (%s: %s)", call, refusal, type(error).__name__, error)
        return refusal
    log.exception("%s failed unexpectedly", call)
    return errors.Internal(f"{call}: internal server error; the server's log has the details")


@contextlib.asynccontextmanager
async def refusals(context: grpc.aio.ServicerContext, call: str) -> AsyncIterator[None]:
    """End the call with the status code of the refusal (or the failure) raised inside.

    ``context.abort`` itself raises to end the call; it is let through untouched.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as error:  # noqa: BLE001 - the one place every failure becomes a status
        refusal = as_refusal(call, error)
        code = next(code for kind, code in STATUS_CODES.items() if isinstance(refusal, kind))
        if isinstance(error, errors.Refusal):
            log.info("%s refused with %s: %s", call, code.name, refusal)
        await context.abort(code, str(refusal))


def _token(context: grpc.aio.ServicerContext) -> str | None:
    return bearer_token(context.invocation_metadata())


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """flora.v1.Coordinator on top of a ``Coordinator``."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def _durable(self) -> None:
        """What a reply acknowledges is on disk first: the store's quick commits, fsynced off the loop."""
        await asyncio.to_thread(self._coordinator.store.sync)

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunReply:
        async with refusals(context, "GetRun"):
            return self._coordinator.get_run()

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        async with refusals(context, "Join"):
            return await self._coordinator.join(request, _token(context))  # durable before it returns

    async def NextTask(self, request: pb.NextTaskRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        async with refusals(context, "NextTask"):
            return await self._coordinator.next_task(self._coordinator.identify(_token(context)), request)

    async def FetchGlobal(
        self, request: pb.FetchGlobalRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transfer_pb2.Chunk]:
        async with refusals(context, "FetchGlobal"):
            async for chunk in self._coordinator.fetch(self._coordinator.identify(_token(context)), request):
                yield chunk

    async def SubmitUpdate(
        self, request_iterator: AsyncIterable[transfer_pb2.UpdateChunk | Piece], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReply:
        async with refusals(context, "SubmitUpdate"):
            reply = await self._coordinator.submit(self._coordinator.identify(_token(context)), aiter(request_iterator))
            try:
                await self._durable()
            except Exception as error:  # the update is recorded; only its fsync failed
                if (refusal := errors.resource_refusal(error, recorded=True)) is None:
                    raise
                raise refusal from None
            return reply

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        async with refusals(context, "Heartbeat"):
            return self._coordinator.heartbeat(self._coordinator.identify(_token(context)), request)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        async with refusals(context, "Leave"):
            return self._coordinator.leave(self._coordinator.identify(_token(context)))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        async with refusals(context, "Status"):
            token = _token(context)
            viewer = None if self._coordinator.credentials.is_operator(token) else self._coordinator.identify(token)
            return operators.enrich(self._coordinator, self._coordinator.status(viewer))

    async def ListClients(self, request: pb.ListClientsRequest, context: grpc.aio.ServicerContext) -> pb.ListClientsReply:
        return operators.list_clients(self._coordinator)  # the interceptor admits the operator token only

    async def RemoveClient(self, request: pb.RemoveClientRequest, context: grpc.aio.ServicerContext) -> pb.RemoveClientReply:
        async with refusals(context, "RemoveClient"):
            return operators.remove_client(self._coordinator, request)

    async def ReadmitClient(self, request: pb.ReadmitClientRequest, context: grpc.aio.ServicerContext) -> pb.ReadmitClientReply:
        async with refusals(context, "ReadmitClient"):
            return operators.readmit_client(self._coordinator, request)

    async def AdvertiseKeys(self, request: secagg_pb2.AdvertiseKeysRequest,
                            context: grpc.aio.ServicerContext) -> secagg_pb2.SecureReply:
        async with refusals(context, "AdvertiseKeys"):
            reply = await self._coordinator.advertise(self._coordinator.identify(_token(context)), request)
            await self._durable()
            return reply

    async def ShareKeys(self, request: secagg_pb2.ShareKeysRequest, context: grpc.aio.ServicerContext) -> secagg_pb2.SecureReply:
        async with refusals(context, "ShareKeys"):
            return await self._secure("ShareKeys").share(self._coordinator.identify(_token(context)), request)

    async def SubmitMasked(self, request_iterator: AsyncIterable[secagg_pb2.MaskedChunk],
                           context: grpc.aio.ServicerContext) -> secagg_pb2.SecureReply:
        async with refusals(context, "SubmitMasked"):
            return await self._secure("SubmitMasked").masked(self._coordinator.identify(_token(context)),
                                                             aiter(request_iterator))

    async def FetchSecure(self, request: secagg_pb2.FetchSecureRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[transfer_pb2.Chunk]:
        async with refusals(context, "FetchSecure"):
            for chunk in self._secure("FetchSecure").fetch(self._coordinator.identify(_token(context)), request):
                yield chunk

    async def Unmask(self, request: secagg_pb2.UnmaskRequest, context: grpc.aio.ServicerContext) -> secagg_pb2.SecureReply:
        async with refusals(context, "Unmask"):
            return await self._secure("Unmask").unmask(self._coordinator.identify(_token(context)), request)

    def _secure(self, call: str) -> SecureRounds:
        secure = self._coordinator.driver.secure
        if secure is None:
            raise errors.FailedPrecondition(f"{call}: this run does not use secure aggregation")
        return secure

    async def Settings(self, request: pb.SettingsRequest, context: grpc.aio.ServicerContext) -> pb.SettingsReply:
        async with refusals(context, "Settings"):
            return round_settings.update_settings(self._coordinator, request)
