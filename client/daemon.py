"""The ``flora-client`` daemon: Join, then NextTask -> sync -> train -> upload, until FINISHED.

One ``Daemon`` runs on the main thread; the only other threads are the heartbeat during a
round's work and the connection's cancel watcher. Stopping (SIGTERM/SIGINT) sets an event: the
in-flight call is cancelled, training stops before its next step, the client says Leave and the
process exits 0. Everything that must survive a crash is in the state directory (see
``flora.client.state``): a restarted daemon rejoins with its saved identity, restores its model
at the saved version, and picks up whatever round the server hands out next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import grpc
import torch

import flora
from flora.client.config import ClientSettings
from flora.client.connection import Connection, Stopped, rpc_code, rpc_details
from flora.client.heartbeat import Heartbeat
from flora.client.limits import check_update
from flora.client.local import (
    ConfigError, LocalModel, check_extras, load_data, load_local_model, run_method, trained_modules,
)
from flora.client.progress import Progress
from flora.client.state import Identity, StateDir
from flora.client import secure_stages
from flora.client.round_start import train_round
from flora.client.secure_stages import SecureSession
from flora.client.step_tries import StepTries
from flora.client.sync import SyncError, Synchroniser, restore
from flora.client.trainer import TrainConfig, TrainingCancelled, TrainResult, total_steps
from flora.client.workers import WorkerFailed, WorkerGroup, worker_devices
from flora.common.devices import resolve_device
from flora.common.chunks import DEFAULT_CHUNK_SIZE
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import AggregationMethod, ClientStart
from flora.common.payload import PayloadMeta, write_adapter
from flora.common.wire import encoded_update_messages
from flora.v1 import coordinator_pb2, run_pb2, secagg_pb2, transfer_pb2

log = logging.getLogger(__name__)

# Refusals of Join that no retry can fix: the operator has to change something.
_JOIN_FATAL = {
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
}
# Upload refusals that mean this client's updates can never be accepted as configured
# (RESOURCE_EXHAUSTED is retried by the connection: the size limit is checked before sending).
_UPLOAD_FATAL = {grpc.StatusCode.INVALID_ARGUMENT}
LEAVE_TIMEOUT_S = 2.0
SIT_OUT_MIN_S = 1.0  # the shortest wait before asking again for a task this client does not do


def _join_refusal(method: str, error: grpc.RpcError) -> Exception:
    """A GetRun/Join refusal no retry can fix becomes a ConfigError; others stay what they are."""
    code = rpc_code(error)
    if code not in _JOIN_FATAL:
        return error
    return ConfigError(f"the server refused {method} ({code.name}): {rpc_details(error)}")


def _scaling_rule(config: TrainConfig) -> int:
    """The wire's ScalingRule of a training configuration."""
    return run_pb2.SCALING_RULE_RSLORA if config.rslora else run_pb2.SCALING_RULE_STANDARD


class RunChanged(Exception):
    """The server now serves a different run: local state and model start over."""


class Daemon:
    """The client's main loop and its reactions to each task and each failure."""

    def __init__(self, settings: ClientSettings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.progress = Progress(settings.progress)
        self.data = load_data(settings)
        check_extras(settings)
        self.state = StateDir(settings.state_dir)
        self.conn = Connection(settings, self.stop)
        self.conn.on_unauthenticated = self._rejoin
        self.spec: run_pb2.RunSpec | None = None
        self.method: AggregationMethod | None = None
        self.local: LocalModel | None = None
        self.sync: Synchroniser | None = None
        self.train_names: list[str] = []
        self.version = 0
        self.secure: SecureSession | None = None  # the secure round's keys and update, in memory only
        self.step_tries = StepTries()  # secure steps that keep failing give their round up
        devices = worker_devices(settings) if settings.training_processes > 1 else []
        self.workers = WorkerGroup(settings, settings.state_dir / "workers", devices) if devices else None

    # --- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        """Take part in the run until it finishes (0) or the daemon is stopped (0)."""
        try:
            self._start()
            while True:
                try:
                    return self._loop()
                except RunChanged as exc:
                    log.warning("event=run_changed detail=%r", str(exc))
                    self._start()
        except Stopped:
            log.info("event=stopping client=%s", self.settings.name)
            self._leave("client stopped")
            return 0
        except ConfigError as exc:
            self._leave(f"client configuration error: {exc}")
            raise
        finally:
            self.conn.close()
            self.state.close()

    def _leave(self, reason: str) -> None:
        """Tell the server we are gone, so that it stops selecting us (best effort, short)."""
        if self.conn.token:
            self.conn.best_effort("Leave", coordinator_pb2.LeaveRequest(reason=reason[:200]), LEAVE_TIMEOUT_S)

    def _start(self) -> None:
        """Read the run, load and check the base model for it, join, restore the saved version.

        GetRun comes first so that the hash presented at Join is computed over the run's own
        target modules; a run replaced between the two calls is simply read again.
        """
        identity = self.state.load_identity()
        if identity is not None and identity.name != self.settings.name:
            raise ConfigError(
                f"state_dir {self.settings.state_dir} belongs to client {identity.name!r}, not {self.settings.name!r}; "
                "use another --state-dir"
            )
        while True:
            run = self._credentialed("GetRun", coordinator_pb2.GetRunRequest()).run
            if self.local is None or self.spec != run:
                self.local = load_local_model(self.settings, run, self.data)
                self.spec = run
            reply = self._join(self.local.digest)
            if reply.run == run:
                break
        self.spec = reply.run
        self.method = run_method(self.spec)
        self.version = restore(self.local.weights, self.state, self.spec)
        self.sync = Synchroniser(self.conn, self.state, self.spec, self.progress)
        self.train_names = trained_modules(self.settings, self.spec)

    def _loop(self) -> int:
        while True:
            request = coordinator_pb2.NextTaskRequest(local_version=self.version, max_wait_ms=int(self.settings.long_poll * 1000))
            task = self.conn.call("NextTask", request, timeout=self.settings.long_poll + self.settings.rpc_timeout)
            kind = task.WhichOneof("kind")
            if kind == "finished":
                return self._finish(task.finished.final_version)
            if kind == "train":
                self._round(task.train)
            elif kind == "secure":
                self._secure_step(task.secure)
            else:
                log.debug("event=wait retry_after_ms=%d reason=%r", task.wait.retry_after_ms, task.wait.reason)
                if self.stop.wait(task.wait.retry_after_ms / 1000):
                    raise Stopped()

    # --- joining ----------------------------------------------------------------------------------

    def _join(self, digest: str) -> coordinator_pb2.JoinReply:
        """Join with the saved identity (or the enrolment token); save who we are in which run."""
        identity = self.state.load_identity()
        request = coordinator_pb2.JoinRequest(
            client_name=self.settings.name, capabilities=self._capabilities(),
            base_model_hash=digest,
        )
        reply = self._credentialed("Join", request)
        if identity is not None and identity.run_id != reply.run.run_id:
            log.warning("event=new_run old_run=%s new_run=%s action=reset_state", identity.run_id, reply.run.run_id)
            self.state.reset_run()
        self.state.save_identity(Identity(
            run_id=reply.run.run_id, client_id=reply.client_id, token=reply.client_token,
            server=self.settings.server, name=self.settings.name,
        ))
        self.state.save_run(reply.run)
        self.conn.token = reply.client_token
        log.info("event=joined client_id=%s run=%s version=%d", reply.client_id, reply.run.run_id, reply.global_version)
        return reply

    def _credentialed(self, method: str, request: Any) -> Any:
        """GetRun or Join with our own token when we have one; if the server does not know it (a
        new run or a lost registration), with the enrolment token. Nothing local is discarded
        here: only a Join reply naming another run resets the state."""
        identity = self.state.load_identity()
        if identity is not None:
            try:
                return self._call_with(method, request, identity.token)
            except grpc.RpcError as exc:
                if rpc_code(exc) != grpc.StatusCode.UNAUTHENTICATED:
                    raise _join_refusal(method, exc) from None
                log.warning("event=identity_rejected call=%s detail=%r action=use_enrolment_token", method, rpc_details(exc))
        try:
            return self._call_with(method, request, self._enrolment_token())
        except grpc.RpcError as exc:
            raise _join_refusal(method, exc) from None

    def _call_with(self, method: str, request: Any, token: str | None) -> Any:
        return self.conn.retrying(method, lambda: self.conn.unary(method, request, token=token), rejoin=False)

    def _rejoin(self) -> None:
        """The server no longer knows our token (a restart lost it, or a new run): join again."""
        reply = self._join(self.local.digest)
        if self.spec is not None and reply.run.run_id != self.spec.run_id:
            self.local = None
            raise RunChanged(f"run {self.spec.run_id} was replaced by run {reply.run.run_id}")

    def _enrolment_token(self) -> str | None:
        return self.settings.token.get_secret_value() if self.settings.token else None

    def _capabilities(self) -> coordinator_pb2.Capabilities:
        own = self.settings.own_train_config()
        return coordinator_pb2.Capabilities(
            rank=own.rank, alpha=own.lora_alpha, scaling_rule=_scaling_rule(own), device=str(resolve_device(own.device)),
            num_examples=len(self.data[0]), software_version=flora.__version__,
        )

    # --- one round ----------------------------------------------------------------------------------

    def _round(self, task: coordinator_pb2.TrainTask) -> None:
        """Sync, train and upload one round; a round that closes meanwhile is dropped, not fatal."""
        if task.HasField("secure") and self.step_tries.gave_up(task.round):  # a new attempt of a round given up
            log.info("event=round_sat_out round=%d reason=secure_round_given_up", task.round)
            self._sit_out(task.deadline_unix_ms)
            return
        log.info("event=round_start round=%d required_version=%d held_version=%d", task.round, task.required_version, self.version)
        with Heartbeat(self.conn, task.round, self.settings.heartbeat_interval) as heartbeat:
            config = self._train_config(task)
            try:
                start = self._prepare(task, config)
            except SyncError as exc:
                log.error("event=sync_failed round=%d detail=%r action=reset_to_base", task.round, str(exc))
                self._reset_to_base()
                self.conn.pause("sync", exc)
                return
            heartbeat.activity = coordinator_pb2.CLIENT_ACTIVITY_TRAINING
            result = self._train(task, config, start, heartbeat)
            if result is None:
                return
            heartbeat.activity = coordinator_pb2.CLIENT_ACTIVITY_UPLOADING
            if task.HasField("secure"):
                self._advertise(task, config, result)
            else:
                self._upload(task, config, result, start)

    def _prepare(self, task: coordinator_pb2.TrainTask, config: TrainConfig) -> ClientStart:
        """Merge up to the required version, then start the round as the run's method says: from
        the server's global LoRA when the task names one (protos/PROTOCOL.md, "Methods"), else fresh."""
        self.version = self.sync.catch_up(self.local.weights, self.version, task.required_version)
        return self.method.start(self._kept(task), config.rank, config.scaling)

    def _kept(self, task: coordinator_pb2.TrainTask) -> LoraAdapter | None:
        """The global LoRA the round starts from, when the task names one."""
        return self.sync.global_lora(task.global_lora_version) if task.start_from_global_lora else None

    def _reset_to_base(self) -> None:
        """Forget the held version: reload the base weights and move the pointer back to 0."""
        self.local = load_local_model(self.settings, self.spec, self.data)
        self.state.commit(self.spec.run_id, 0, {})
        self.version = 0

    def _train_config(self, task: coordinator_pb2.TrainTask) -> TrainConfig:
        hints = run_pb2.TrainingHints()
        hints.CopyFrom(self.spec.hints)
        for field, value in task.hints.ListFields():  # the round's non-zero hints win over the run's
            setattr(hints, field.name, value)
        return self.settings.train_config(self.train_names, hints, len(self.local.train), seed=self.settings.seed + task.round,
                                          round_number=task.round, rounds=self.spec.rounds)

    def _train(
        self, task: coordinator_pb2.TrainTask, config: TrainConfig, start: ClientStart, heartbeat: Heartbeat
    ) -> TrainResult | None:
        """Train the round; None when the round closed (or the daemon stops) meanwhile."""
        def on_step(step: int, total: int, loss: float) -> None:
            heartbeat.progress = step / total
            bar.update(1, loss=loss)

        def should_stop() -> bool:
            return self.stop.is_set() or heartbeat.round_closed.is_set()

        steps = total_steps(len(self.local.train), config)
        log.info("event=train_start round=%d rank=%d steps=%d examples=%d", task.round, config.rank, steps, len(self.local.train))
        with self.progress.bar(f"train round {task.round}", steps, unit="step") as bar:
            try:
                if self.workers is None:
                    result = train_round(
                        self.local.weights, self.local.train, config, start, val_data=self.local.validation or None,
                        on_step=on_step, should_stop=should_stop,
                    )
                else:
                    weights = self.state.weights_path(self.version) if self.version else None
                    result = self.workers.train(self.spec, self.version, weights, config, start, on_step=on_step,
                                                should_stop=should_stop)
            except TrainingCancelled as exc:
                if self.stop.is_set():
                    raise Stopped() from None
                log.info("event=update_dropped round=%d reason=round_closed detail=%r", task.round, str(exc))
                return None
            except WorkerFailed as exc:  # the round's task is asked for again after the backoff
                log.error("event=train_failed round=%d detail=%r action=retry", task.round, str(exc))
                self.conn.pause("train", exc)
                return None
        log.info(
            "event=trained round=%d rank=%d steps=%d train_loss=%.4f validation_loss=%s seconds=%.1f",
            task.round, config.rank, result.steps, result.train_loss,
            "-" if result.validation_loss is None else f"{result.validation_loss:.4f}", result.seconds,
        )
        return result

    def _upload(self, task: coordinator_pb2.TrainTask, config: TrainConfig, result: TrainResult, start: ClientStart) -> None:
        """Check the update against the run's limits, then upload it; a refusal because the round
        moved on drops the update."""
        adapter = self._complete(result.adapter, config.rank)
        check_update(self.spec, adapter, start.init)
        payload = self.state.outbox_path(task.round)
        header = self._encode(task, config, result, adapter, payload)
        try:
            reply = self.conn.retrying("SubmitUpdate", lambda: self.conn.upload(self._messages(header, payload)))
        except grpc.RpcError as exc:
            code = rpc_code(exc)
            if code in _UPLOAD_FATAL:
                raise ConfigError(f"the server refused this client's update ({code.name}): {rpc_details(exc)}") from None
            log.warning("event=update_dropped round=%d code=%s detail=%r", task.round, code and code.name, rpc_details(exc))
            return
        finally:
            payload.unlink(missing_ok=True)
        log.info("event=uploaded round=%d bytes=%d accepted=%s duplicate=%s message=%r",
                 task.round, header.total_bytes, reply.accepted, reply.duplicate, reply.message)

    def _encode(
        self, task: coordinator_pb2.TrainTask, config: TrainConfig, result: TrainResult, adapter: LoraAdapter, path: Path
    ) -> transfer_pb2.UpdateHeader:
        """Write the round's factors (float32 safetensors) to ``path``; return the header describing them.

        The upload streams from this file, so memory holds a chunk of it at a time, not all of it.
        A method that freezes A (ffa) uploads B alone: the server holds A already.
        """
        rule = "rslora" if config.rslora else "standard"  # the payload's words for _scaling_rule(config)
        meta = PayloadMeta("client_update", rank=config.rank, alpha=config.lora_alpha, scaling_rule=rule, round=task.round)
        size, digest = write_adapter(path, adapter, meta, with_a=self.method.trains_a)
        if size > self.spec.max_update_bytes > 0:
            path.unlink(missing_ok=True)
            raise ConfigError(f"an update of rank {config.rank} is {size} bytes; the server accepts at most "
                              f"{self.spec.max_update_bytes}: lower --rank")
        return self._header(task, config, result, size, digest)

    @staticmethod
    def _header(task: coordinator_pb2.TrainTask, config: TrainConfig, result: TrainResult, size: int,
                digest: str) -> transfer_pb2.UpdateHeader:
        """The claims about a trained update: what a SubmitUpdate header (or an advertisement) says."""
        header = transfer_pb2.UpdateHeader(
            round=task.round, rank=config.rank, alpha=config.lora_alpha, scaling_rule=_scaling_rule(config),
            num_examples=result.num_examples, total_bytes=size, sha256=digest,
            base_version=task.required_version, train_loss=result.train_loss, steps=result.steps,
            train_seconds=result.seconds,
        )
        if result.validation_loss is not None:
            header.validation_loss = result.validation_loss
        return header

    def _advertise(self, task: coordinator_pb2.TrainTask, config: TrainConfig, result: TrainResult) -> None:
        """Secure aggregation: keep the update in memory and advertise the round's keys instead."""
        adapter = self._complete(result.adapter, config.rank)
        header = self._header(task, config, result, 0, "")
        try:
            self.secure = secure_stages.advertise(self.conn, self.spec, task.secure, header, adapter, self._kept(task),
                                                  self.method)
        except grpc.RpcError as exc:  # the round moved on (or refused the keys): this update is dropped
            code = rpc_code(exc)
            log.warning("event=update_dropped round=%d code=%s detail=%r", task.round, code and code.name, rpc_details(exc))

    def _secure_step(self, task: secagg_pb2.SecureTask) -> None:
        """One step of a secure round. A failed step is asked for again while it is open, up to
        ``StepTries``' cap; then, as for a step this client cannot do (no session: a restart), it
        sits the step out until its deadline instead of polling for it, and counts as dropped."""
        step = secure_stages.step_label(task)
        try:
            done = not self.step_tries.gave_up(task.round) and secure_stages.handle(self.conn, self.secure, task)
        except (grpc.RpcError, ValueError) as exc:  # SecAggError is a ValueError: a request the protocol refuses
            detail = rpc_details(exc) if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("event=secure_step_failed round=%d step=%s detail=%r", task.round, step, detail)
            if self.step_tries.failed(task.round, step, detail):
                self.secure = None
                self._sit_out(task.deadline_unix_ms)
            return
        if done:
            self.step_tries.succeeded(task.round, step)
        else:
            self._sit_out(task.deadline_unix_ms)

    def _sit_out(self, deadline_unix_ms: int) -> None:
        """Wait until a task's deadline (at least ``SIT_OUT_MIN_S``) instead of asking for it again at once."""
        if self.stop.wait(max(SIT_OUT_MIN_S, deadline_unix_ms / 1000 - time.time())):
            raise Stopped()

    def _messages(self, header: transfer_pb2.UpdateHeader, payload: Path) -> Iterator[bytes]:
        """The upload stream, advancing the upload's progress bar as gRPC consumes it."""
        with self.progress.bar(f"upload round {header.round}", header.total_bytes, unit="B") as bar:
            yield from encoded_update_messages(header, payload, self.spec.chunk_size or DEFAULT_CHUNK_SIZE, bar.update)

    def _complete(self, adapter: LoraAdapter, rank: int) -> LoraAdapter:
        """Every run module in the upload: those this client does not train contribute zero."""
        pairs = dict(adapter.pairs)
        for module in self.spec.target_modules:
            if module.name not in pairs:
                pairs[module.name] = LoraPair(torch.zeros(rank, module.in_features), torch.zeros(module.out_features, rank))
        return LoraAdapter(pairs, adapter.scaling)

    # --- the end ------------------------------------------------------------------------------------

    def _finish(self, final_version: int) -> int:
        """Bring the model to the run's final version, so that it equals the server's final model."""
        self.version = self.sync.catch_up(self.local.weights, self.version, final_version)
        log.info("event=finished version=%d state_dir=%s", self.version, self.settings.state_dir)
        return 0
