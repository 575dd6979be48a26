"""Pure commit/rollback protocol of a migration, for both roles: (state, event) -> (state, commands).

No I/O and no clock: a runner (migration/source.py, migration/destination.py) reports what happened
as an event, executes the returned commands in order and keeps the returned state. Like
policy.tick for the pre-copy loop.

The rule both roles keep: the VM never runs on both hosts, and is never lost.
- The shadow on the destination resumes only on the source's commit request, and only while it
  has not been ordered destroyed; once committed it refuses to be destroyed.
- The source resumes its copy only while no commit request can have reached the destination, or
  once the destination has destroyed the shadow (which then refuses every commit). When neither
  is known (the commit and the destroy both unanswered), the source stays paused until the
  destination answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

# ============================================================================================ source


class SourcePhase(str, Enum):
    PREPARE = "prepare"  # asking the destination for its shadow VM
    PRECOPY = "precopy"  # the stream runs, the VM runs here
    SWITCHOVER = "switchover"  # the VM is paused here; what is outside QEMU (leases) may move
    COMMIT = "commit"  # the stream completed: the destination is asked to take the VM
    SETTLE = "settle"  # the commit failed: destroying the shadow decides where the VM runs
    CONFIRM = "confirm"  # the shadow turned out committed: its resume time is asked once more
    HELD = "held"  # neither the commit nor the destroy was answered: paused here until one is
    DONE = "done"  # the VM runs on the destination; the copy here goes
    ROLLED_BACK = "rolled-back"  # the VM runs (or is resumed) here; the shadow is gone or goes
    LEFT = "left"  # held, and the destination never answered: the operator's

    @property
    def terminal(self) -> bool:
        return self in (SourcePhase.DONE, SourcePhase.ROLLED_BACK, SourcePhase.LEFT)


class Outcome(str, Enum):
    """How a rolled-back migration's record ends."""

    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SourceState:
    phase: SourcePhase = SourcePhase.PREPARE
    shadow: bool = False  # the destination has (or may have) a shadow to destroy on rollback
    handed_over: bool = False  # hooks may have moved what is outside QEMU: take it back first
    delivered: bool = False  # a commit request may have reached the destination
    paused: bool = False  # the VM's vCPUs are stopped here
    ran_there: bool = False  # the destination said it runs the VM
    reason: str = ""  # why the commit failed, for the record if the migration rolls back

    @property
    def runs_here(self) -> bool:
        """The VM's copy here runs (or is being resumed)."""
        return not self.paused and self.phase is not SourcePhase.DONE


# ---- source events


@dataclass(frozen=True)
class ShadowPrepared:
    """The destination answered the prepare: its shadow listens for the stream."""


@dataclass(frozen=True)
class SwitchoverBegan:
    """QEMU stopped the VM's vCPUs here for the switchover."""


@dataclass(frozen=True)
class StreamCompleted:
    """QEMU sent the whole stream; the destination holds the VM, paused."""


@dataclass(frozen=True)
class Failed:
    """A step before the commit failed: the stream broke or stalled, the policy gave up, a hook failed."""

    reason: str


@dataclass(frozen=True)
class CancelAsked:
    """A user, or the destination giving up its shadow, cancelled the migration."""

    reason: str


@dataclass(frozen=True)
class Shutdown:
    """This agent is stopping: its task was cancelled."""


@dataclass(frozen=True)
class CommitAnswered:
    """The destination committed: the VM runs there."""


@dataclass(frozen=True)
class CommitFailed:
    """The commit got an error or no answer. `delivered`: the request may have reached the
    destination (anything but never connecting)."""

    reason: str
    delivered: bool


@dataclass(frozen=True)
class ShadowDestroyed:
    """The destination destroyed the shadow (or had none left): from now on it refuses a commit."""


@dataclass(frozen=True)
class ShadowCommitted:
    """The destination refused to destroy the shadow: it had committed, the VM runs there."""


@dataclass(frozen=True)
class DestroyUnanswered:
    reason: str


@dataclass(frozen=True)
class ResolveGaveUp:
    """The destination did not answer for as long as the source keeps asking."""


SourceEvent = (ShadowPrepared | SwitchoverBegan | StreamCompleted | Failed | CancelAsked | Shutdown | CommitAnswered
               | CommitFailed | ShadowDestroyed | ShadowCommitted | DestroyUnanswered | ResolveGaveUp)


# ---- source commands


@dataclass(frozen=True)
class StartStream:
    """Run pre-copy under the convergence policy."""


@dataclass(frozen=True)
class HandOver:
    """Hooks hand over what is outside QEMU (disk leases), then the switchover goes on."""


@dataclass(frozen=True)
class Commit:
    """Ask the destination to commit (retried while it cannot be reached)."""


@dataclass(frozen=True)
class AskCommitted:
    """Ask a destination that has committed for its answer once more (the resume time)."""


@dataclass(frozen=True)
class DestroyShadow:
    """Ask the destination to destroy its shadow (it refuses once it has committed)."""


@dataclass(frozen=True)
class TakeBack:
    """Hooks take back what they handed over (disk leases), before anything resumes here."""


@dataclass(frozen=True)
class ResumeHere:
    """End QEMU's stream if it still runs, and resume the VM here."""


@dataclass(frozen=True)
class FinishHere:
    """The VM runs on the destination: hooks' after-commit, then the copy here is destroyed."""


@dataclass(frozen=True)
class HoldPaused:
    """Keep the VM paused here and, with a reason, end the record failed saying why."""

    reason: str | None


@dataclass(frozen=True)
class Resolve:
    """Keep asking the destination to destroy the shadow, reporting each answer as an event."""


@dataclass(frozen=True)
class EndRecord:
    """The record's end: done, or failed/cancelled with a reason."""

    outcome: Outcome | None  # None: done
    reason: str = ""


@dataclass(frozen=True)
class Note:
    """Add how a held migration was settled to its (already ended) record."""

    text: str


SourceCommand = (StartStream | HandOver | Commit | AskCommitted | DestroyShadow | TakeBack | ResumeHere | FinishHere
                 | HoldPaused | Resolve | EndRecord | Note)


@dataclass(frozen=True)
class SourceStep:
    state: SourceState
    commands: tuple[SourceCommand, ...] = ()


_BEFORE_COMMIT = (SourcePhase.PREPARE, SourcePhase.PRECOPY, SourcePhase.SWITCHOVER)
_COMMITTING = (SourcePhase.COMMIT, SourcePhase.SETTLE, SourcePhase.CONFIRM)


def _rollback(state: SourceState, outcome: Outcome, reason: str) -> SourceStep:
    """Take back what was handed over, resume here, destroy the shadow, end the record."""
    commands: list[SourceCommand] = []
    if state.handed_over:
        commands.append(TakeBack())
    commands.append(ResumeHere())
    if state.shadow:
        commands.append(DestroyShadow())
    commands.append(EndRecord(outcome, reason))
    return SourceStep(dataclasses.replace(state, phase=SourcePhase.ROLLED_BACK, paused=False, handed_over=False),
                      tuple(commands))


def _done(state: SourceState) -> SourceStep:
    return SourceStep(dataclasses.replace(state, phase=SourcePhase.DONE, ran_there=True),
                      (FinishHere(), EndRecord(None)))


def source_step(state: SourceState, event: SourceEvent) -> SourceStep:
    """The source's next state and commands on `event`. An event a phase does not expect changes nothing."""
    phase = state.phase
    if phase in _BEFORE_COMMIT:
        if isinstance(event, ShadowPrepared) and phase is SourcePhase.PREPARE:
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.PRECOPY, shadow=True), (StartStream(),))
        if isinstance(event, SwitchoverBegan) and phase is SourcePhase.PRECOPY:
            # From here a hand-over may have happened even if it then fails: taking back is idempotent.
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.SWITCHOVER, paused=True, handed_over=True),
                              (HandOver(),))
        if isinstance(event, StreamCompleted) and phase is not SourcePhase.PREPARE:
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.COMMIT, paused=True), (Commit(),))
        if isinstance(event, Failed):
            return _rollback(state, Outcome.FAILED, event.reason)
        if isinstance(event, CancelAsked):
            return _rollback(state, Outcome.CANCELLED, event.reason)
        if isinstance(event, Shutdown):
            return _rollback(state, Outcome.CANCELLED, "the agent is shutting down")
        return SourceStep(state)
    if phase in _COMMITTING and isinstance(event, Shutdown):
        # A commit may be under way: resuming here could make two copies. The restarted agent asks.
        return SourceStep(dataclasses.replace(state, phase=SourcePhase.LEFT),
                          (HoldPaused("the agent shut down during the commit"),))
    if phase in _COMMITTING and isinstance(event, Failed):
        # Something broke while committing: whether the destination runs the VM is unknown, so ask it.
        return SourceStep(dataclasses.replace(state, phase=SourcePhase.HELD), (HoldPaused(event.reason), Resolve()))
    if phase is SourcePhase.COMMIT:
        if isinstance(event, CommitAnswered):
            return _done(state)
        if isinstance(event, CommitFailed):
            # A lost answer, or a request the destination reads late, may still commit: destroying
            # the shadow settles it before anything resumes here.
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.SETTLE, delivered=event.delivered,
                                                  reason=event.reason), (DestroyShadow(),))
        return SourceStep(state)
    if phase is SourcePhase.SETTLE:
        if isinstance(event, ShadowDestroyed):
            return _rollback(dataclasses.replace(state, shadow=False), Outcome.FAILED, state.reason)
        if isinstance(event, ShadowCommitted):
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.CONFIRM), (AskCommitted(),))
        if isinstance(event, DestroyUnanswered):
            if not state.delivered:  # no commit ever reached it: nothing but our commit resumes the shadow
                return _rollback(state, Outcome.FAILED, state.reason)
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.HELD),
                              (HoldPaused(event.reason), Resolve()))
        return SourceStep(state)
    if phase is SourcePhase.CONFIRM:
        if isinstance(event, (CommitAnswered, CommitFailed)):  # committed either way: only the resume time is unsure
            return _done(state)
        return SourceStep(state)
    if phase is SourcePhase.HELD:
        if isinstance(event, ShadowDestroyed):
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.ROLLED_BACK, paused=False, shadow=False,
                                                  handed_over=False),
                              ((TakeBack(),) if state.handed_over else ()) + (ResumeHere(), Note("destroyed")))
        if isinstance(event, ShadowCommitted):
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.DONE, ran_there=True),
                              (FinishHere(), Note("committed")))
        if isinstance(event, ResolveGaveUp):
            return SourceStep(dataclasses.replace(state, phase=SourcePhase.LEFT))
        return SourceStep(state)  # unanswered again: Resolve keeps asking
    return SourceStep(state)  # terminal


def source_start() -> SourceStep:
    """A new migration: the shadow first, before any memory moves."""
    return SourceStep(SourceState())


@dataclass(frozen=True)
class Recovered:
    """What a restarted source agent finds of a migration it was driving."""

    record_terminal: bool  # the record had ended (done, failed or cancelled)
    record_done: bool
    stream_completed: bool  # the VM's QEMU says its stream completed
    vm_migrating: bool  # the VM is still here, paused after that stream


def source_recover(found: Recovered, reason: str) -> SourceStep:
    """A restarted source agent: a VM whose stream completed but that was never destroyed may run on
    the destination, or nowhere; it stays paused and the destination is asked (as after a commit
    with no answer). A migration that had not completed was cancelled (host/vms.py resumed the VM):
    its record ends so, which also tells the destination's guard to destroy the shadow."""
    if found.stream_completed and found.vm_migrating and not found.record_done:
        held = SourceState(phase=SourcePhase.HELD, shadow=True, handed_over=True, delivered=True, paused=True)
        return SourceStep(held, (HoldPaused(None if found.record_terminal else reason), Resolve()))
    if not found.record_terminal:
        return SourceStep(SourceState(phase=SourcePhase.ROLLED_BACK), (EndRecord(Outcome.FAILED, reason),))
    return SourceStep(SourceState(phase=SourcePhase.ROLLED_BACK))


# ======================================================================================= destination


class ShadowPhase(str, Enum):
    PREPARING = "preparing"  # the shadow VM is being made
    WAITING = "waiting"  # paused, receiving the stream; only its source may commit or abort it
    COMMITTING = "committing"  # the commit waits for the stream's end to load
    RUNNING = "running"  # committed: the VM is this host's
    STALE = "stale"  # found after this agent restarted: never committed now; its source is asked to cancel
    GONE = "gone"  # destroyed (or being destroyed): every commit is refused

    @property
    def active(self) -> bool:
        """Counts against the host's migration limit."""
        return self in (ShadowPhase.PREPARING, ShadowPhase.WAITING, ShadowPhase.COMMITTING)


@dataclass(frozen=True)
class ShadowState:
    phase: ShadowPhase = ShadowPhase.PREPARING


# ---- destination events


@dataclass(frozen=True)
class ShadowReady:
    """The shadow listens for the stream."""


@dataclass(frozen=True)
class PrepareBroke:
    reason: str


@dataclass(frozen=True)
class CommitAsked:
    """The source asks to commit."""


@dataclass(frozen=True)
class StreamLoaded:
    """The shadow has loaded the whole stream."""


@dataclass(frozen=True)
class StreamNotLoaded:
    reason: str


@dataclass(frozen=True)
class AbortAsked:
    """The source asks to destroy the shadow."""


@dataclass(frozen=True)
class SourceGaveUp:
    """The source reports the migration failed or cancelled, knows it not, or stayed silent too long."""

    reason: str


@dataclass(frozen=True)
class AgentRestarted:
    """This agent restarted and found the shadow still there."""


@dataclass(frozen=True)
class SourceEnded:
    """A stale shadow's source ended its migration, or did not within the wait (or cannot be asked)."""


ShadowEvent = (ShadowReady | PrepareBroke | CommitAsked | StreamLoaded | StreamNotLoaded | AbortAsked | SourceGaveUp
               | AgentRestarted | SourceEnded)


# ---- destination commands


@dataclass(frozen=True)
class GuardShadow:
    """Ask the source about the migration until the shadow is committed or gone."""


@dataclass(frozen=True)
class WaitLoaded:
    """Wait (bounded) until the shadow has loaded the stream's end."""


@dataclass(frozen=True)
class TakeVm:
    """Record the VM as this host's (persisted before it runs), resume it, announce its MACs."""


@dataclass(frozen=True)
class AnswerCommitted:
    """Answer the commit as done (the resume time); also to a retried commit."""


@dataclass(frozen=True)
class Refuse:
    """Refuse the request: `committed` (the VM runs here) or the shadow is being destroyed or failed."""

    reason: str
    committed: bool = False


@dataclass(frozen=True)
class Destroy:
    """Destroy the shadow VM and forget its source."""


@dataclass(frozen=True)
class AskSourceCancel:
    """Ask the source to cancel and wait (bounded) until its record ends."""


ShadowCommand = GuardShadow | WaitLoaded | TakeVm | AnswerCommitted | Refuse | Destroy | AskSourceCancel


@dataclass(frozen=True)
class ShadowStep:
    state: ShadowState
    commands: tuple[ShadowCommand, ...] = ()


_GONE = ShadowState(ShadowPhase.GONE)


def shadow_step(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    """The destination's next state and commands on `event`."""
    phase = state.phase
    if isinstance(event, CommitAsked):
        if phase is ShadowPhase.WAITING:
            return ShadowStep(ShadowState(ShadowPhase.COMMITTING), (WaitLoaded(),))
        if phase is ShadowPhase.RUNNING:
            return ShadowStep(state, (AnswerCommitted(),))  # a retried commit: already done
        return ShadowStep(state, (Refuse("given up"),))
    if isinstance(event, AbortAsked):
        if phase is ShadowPhase.RUNNING:
            return ShadowStep(state, (Refuse("committed", committed=True),))
        # Also while a commit waits for the stream: the abort wins, the commit is refused after.
        return ShadowStep(_GONE, () if phase is ShadowPhase.GONE else (Destroy(),))
    if phase is ShadowPhase.PREPARING:
        if isinstance(event, ShadowReady):
            return ShadowStep(ShadowState(ShadowPhase.WAITING), (GuardShadow(),))
        if isinstance(event, PrepareBroke):
            return ShadowStep(_GONE, (Destroy(),))
    if phase is ShadowPhase.COMMITTING:
        if isinstance(event, StreamLoaded):
            return ShadowStep(ShadowState(ShadowPhase.RUNNING), (TakeVm(), AnswerCommitted()))
        if isinstance(event, StreamNotLoaded):
            return ShadowStep(ShadowState(ShadowPhase.WAITING), (Refuse(event.reason),))
    if phase is ShadowPhase.GONE and isinstance(event, (StreamLoaded, StreamNotLoaded)):
        return ShadowStep(state, (Refuse("given up"),))  # destroyed while the commit waited
    if isinstance(event, SourceGaveUp) and phase in (ShadowPhase.WAITING, ShadowPhase.COMMITTING):
        return ShadowStep(_GONE, (Destroy(),))
    if isinstance(event, AgentRestarted) and phase in (ShadowPhase.WAITING, ShadowPhase.COMMITTING,
                                                       ShadowPhase.PREPARING):
        # A restarted agent never commits a shadow it had not committed: its source keeps the VM.
        return ShadowStep(ShadowState(ShadowPhase.STALE), (AskSourceCancel(),))
    if isinstance(event, SourceEnded) and phase is ShadowPhase.STALE:
        return ShadowStep(_GONE, (Destroy(),))
    return ShadowStep(state)
