"""The pure commit/rollback protocol (kvmotion/migration/protocol.py): every path of both roles,
and a property over a simulated lossy network: no sequence of events runs the VM on both hosts."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from kvmotion.api.migration import Compression, StreamCapabilities, StreamSettings
from kvmotion.migration import protocol as p
from kvmotion.migration.protocol import ShadowPhase as D
from kvmotion.migration.protocol import SourcePhase as S


def run_source(*events: p.SourceEvent, state: p.SourceState | None = None) -> tuple[p.SourceState, list]:
    """Feed `events` in order; the state and every command issued."""
    state = state or p.source_start().state
    commands: list = []
    for event in events:
        step = p.source_step(state, event)
        state = step.state
        commands.extend(step.commands)
    return state, commands


def kinds(commands) -> list[type]:  # type: ignore[no-untyped-def]
    return [type(c) for c in commands]


AT_COMMIT = (p.ShadowPrepared(), p.SwitchoverBegan(), p.StreamCompleted())


# ---- source: the way through ----------------------------------------------------------------------
def test_source_happy_path():
    state, commands = run_source(*AT_COMMIT, p.CommitAnswered())
    assert state.phase is S.DONE and state.ran_there and not state.runs_here
    assert kinds(commands) == [p.StartStream, p.HandOver, p.Commit, p.FinishHere, p.EndRecord]
    assert commands[-1] == p.EndRecord(None)


def test_a_stream_that_completes_without_the_pause_still_commits():
    state, commands = run_source(p.ShadowPrepared(), p.StreamCompleted(), p.CommitAnswered())
    assert state.phase is S.DONE and kinds(commands)[-3:] == [p.Commit, p.FinishHere, p.EndRecord]


# ---- source: rollback before the commit -------------------------------------------------------------
@pytest.mark.parametrize("event, outcome, reason", [
    (p.Failed("stream broke"), p.Outcome.FAILED, "stream broke"),
    (p.CancelAsked("cancelled by the user"), p.Outcome.CANCELLED, "cancelled by the user"),
    (p.Shutdown(), p.Outcome.CANCELLED, "the agent is shutting down"),
])
@pytest.mark.parametrize("before, expected", [
    ((), [p.ResumeHere]),  # prepare: no shadow was answered, nothing handed over
    ((p.ShadowPrepared(),), [p.ResumeHere, p.DestroyShadow]),
    ((p.ShadowPrepared(), p.SwitchoverBegan()), [p.TakeBack, p.ResumeHere, p.DestroyShadow]),
])
def test_rollback_before_commit(event, outcome, reason, before, expected):
    state, _ = run_source(*before)
    step = p.source_step(state, event)
    assert step.state.phase is S.ROLLED_BACK and step.state.runs_here and not step.state.handed_over
    assert kinds(step.commands) == [*expected, p.EndRecord]
    assert step.commands[-1] == p.EndRecord(outcome, reason)


def test_leases_are_taken_back_before_the_source_resumes():
    state, _ = run_source(p.ShadowPrepared(), p.SwitchoverBegan())
    order = kinds(p.source_step(state, p.Failed("hook failed")).commands)
    assert order.index(p.TakeBack) < order.index(p.ResumeHere)


def test_too_late_to_cancel_once_committing():
    state, _ = run_source(*AT_COMMIT)
    for phase_events in ((), (p.CommitFailed("lost", True),), (p.CommitFailed("lost", True), p.ShadowCommitted())):
        s, _ = run_source(*phase_events, state=state)
        assert p.source_step(s, p.CancelAsked("the user")) == p.SourceStep(s)
        # A step that breaks while committing leaves the VM paused and asks the destination.
        held = p.source_step(s, p.Failed("a bug"))
        assert held.state.phase is S.HELD and held.commands == (p.HoldPaused("a bug"), p.Resolve())


@pytest.mark.parametrize("after", [(), (p.CommitFailed("x", True),), (p.CommitFailed("x", True), p.ShadowCommitted())])
def test_shutdown_while_committing_holds_the_vm_paused(after):
    state, _ = run_source(*AT_COMMIT, *after)
    step = p.source_step(state, p.Shutdown())
    assert step.state.phase is S.LEFT and not step.state.runs_here
    assert kinds(step.commands) == [p.HoldPaused]


# ---- source: commit resolution ----------------------------------------------------------------------
def test_commit_failed_destroys_the_shadow_first():
    state, _ = run_source(*AT_COMMIT)
    step = p.source_step(state, p.CommitFailed("could not commit on b: refused", delivered=True))
    assert step.state.phase is S.SETTLE and kinds(step.commands) == [p.DestroyShadow] and not step.state.runs_here


def test_commit_failed_then_shadow_destroyed_rolls_back_with_the_commit_error():
    state, commands = run_source(*AT_COMMIT, p.CommitFailed("could not commit on b: refused", True), p.ShadowDestroyed())
    assert state.phase is S.ROLLED_BACK and state.runs_here
    tail = commands[commands.index(p.DestroyShadow()) + 1:]
    assert kinds(tail) == [p.TakeBack, p.ResumeHere, p.EndRecord]  # the shadow is gone: not destroyed twice
    assert tail[-1] == p.EndRecord(p.Outcome.FAILED, "could not commit on b: refused")


def test_commit_answer_lost_but_committed_finishes_here():
    state, commands = run_source(*AT_COMMIT, p.CommitFailed("timeout", True), p.ShadowCommitted())
    assert state.phase is S.CONFIRM and commands[-1] == p.AskCommitted()
    for answer in (p.CommitAnswered(), p.CommitFailed("no answer", True)):
        done, more = run_source(answer, state=state)
        assert done.phase is S.DONE and kinds(more) == [p.FinishHere, p.EndRecord]


def test_commit_never_delivered_and_destroy_unanswered_rolls_back():
    """No commit request ever reached the destination: nothing but our commit resumes the shadow."""
    state, commands = run_source(*AT_COMMIT, p.CommitFailed("connect refused", delivered=False), p.DestroyUnanswered("x"))
    assert state.phase is S.ROLLED_BACK and state.runs_here
    assert commands[-1] == p.EndRecord(p.Outcome.FAILED, "connect refused")


def test_commit_and_destroy_both_unanswered_hold_the_vm():
    state, commands = run_source(*AT_COMMIT, p.CommitFailed("timeout", delivered=True), p.DestroyUnanswered("held: why"))
    assert state.phase is S.HELD and not state.runs_here
    assert commands[-2:] == [p.HoldPaused("held: why"), p.Resolve()]


def test_held_vm_settles_either_way():
    held, _ = run_source(*AT_COMMIT, p.CommitFailed("timeout", True), p.DestroyUnanswered("why"))
    assert p.source_step(held, p.DestroyUnanswered("again")) == p.SourceStep(held)  # Resolve keeps asking
    back = p.source_step(held, p.ShadowDestroyed())
    assert back.state.phase is S.ROLLED_BACK and back.state.runs_here
    assert kinds(back.commands) == [p.TakeBack, p.ResumeHere, p.Note]
    there = p.source_step(held, p.ShadowCommitted())
    assert there.state.phase is S.DONE and kinds(there.commands) == [p.FinishHere, p.Note]
    left = p.source_step(held, p.ResolveGaveUp())
    assert left.state.phase is S.LEFT and not left.commands and not left.state.runs_here


@pytest.mark.parametrize("final", [S.DONE, S.ROLLED_BACK, S.LEFT])
def test_terminal_source_ignores_everything(final):
    state = p.SourceState(phase=final)
    for event in (p.ShadowPrepared(), p.StreamCompleted(), p.Failed("x"), p.Shutdown(), p.CommitAnswered(),
                  p.ShadowDestroyed(), p.ShadowCommitted(), p.CancelAsked("x")):
        assert p.source_step(state, event) == p.SourceStep(state)


# ---- source: restart recovery -----------------------------------------------------------------------
def test_recovery_of_a_completed_stream_holds_and_asks():
    found = p.Recovered(record_terminal=False, record_done=False, stream_completed=True, vm_migrating=True)
    step = p.source_recover(found, "restarted after the stream had completed")
    assert step.state.phase is S.HELD and step.state.handed_over and not step.state.runs_here
    assert step.commands == (p.HoldPaused("restarted after the stream had completed"), p.Resolve())
    # A record that had ended already (held before the restart) is not ended again.
    again = p.source_recover(dataclasses.replace(found, record_terminal=True), "x")
    assert again.commands == (p.HoldPaused(None), p.Resolve())


def test_recovery_of_an_unfinished_migration_ends_its_record():
    found = p.Recovered(record_terminal=False, record_done=False, stream_completed=False, vm_migrating=False)
    assert p.source_recover(found, "gave it up").commands == (p.EndRecord(p.Outcome.FAILED, "gave it up"),)
    done = p.Recovered(record_terminal=True, record_done=True, stream_completed=True, vm_migrating=True)
    assert p.source_recover(done, "x").commands == ()


# ---- destination ---------------------------------------------------------------------------------------
def run_shadow(*events: p.ShadowEvent, state: p.ShadowState | None = None) -> tuple[p.ShadowState, list]:
    state = state or p.ShadowState()
    commands: list = []
    for event in events:
        step = p.shadow_step(state, event)
        state = step.state
        commands.extend(step.commands)
    return state, commands


def test_shadow_commit():
    state, commands = run_shadow(p.ShadowReady(), p.CommitAsked(), p.StreamLoaded())
    assert state.phase is D.RUNNING and kinds(commands) == [p.GuardShadow, p.WaitLoaded, p.TakeVm, p.AnswerCommitted]
    # A retried commit is answered again; an abort is refused: the VM runs here.
    assert p.shadow_step(state, p.CommitAsked()).commands == (p.AnswerCommitted(),)
    refused = p.shadow_step(state, p.AbortAsked())
    assert refused.state == state and refused.commands == (p.Refuse("committed", committed=True),)
    assert p.shadow_step(state, p.SourceGaveUp("x")) == p.ShadowStep(state)
    assert p.shadow_step(state, p.AgentRestarted()) == p.ShadowStep(state)


def test_shadow_prepare_fails():
    assert run_shadow(p.PrepareBroke("no memory")) == (p.ShadowState(D.GONE), [p.Destroy()])


def test_stream_not_loaded_refuses_and_waits():
    state, commands = run_shadow(p.ShadowReady(), p.CommitAsked(), p.StreamNotLoaded("incoming failed"))
    assert state.phase is D.WAITING and commands[-1] == p.Refuse("incoming failed")


def test_abort_while_the_commit_waits_wins():
    state, _ = run_shadow(p.ShadowReady(), p.CommitAsked())
    state, commands = run_shadow(p.AbortAsked(), p.StreamLoaded(), state=state)
    assert state.phase is D.GONE and commands == [p.Destroy(), p.Refuse("given up")]


@pytest.mark.parametrize("event", [p.AbortAsked(), p.SourceGaveUp("source reports it failed")])
def test_uncommitted_shadow_is_destroyed(event):
    state, commands = run_shadow(p.ShadowReady(), event)
    assert state.phase is D.GONE and commands[-1] == p.Destroy()
    # Gone: commits refused, a second abort answered without destroying twice.
    assert p.shadow_step(state, p.CommitAsked()).commands == (p.Refuse("given up"),)
    assert p.shadow_step(state, p.AbortAsked()) == p.ShadowStep(state)


def test_stale_shadow_after_restart():
    state, commands = run_shadow(p.ShadowReady(), p.AgentRestarted())
    assert state.phase is D.STALE and commands[-1] == p.AskSourceCancel() and not state.phase.active
    assert p.shadow_step(state, p.CommitAsked()).commands == (p.Refuse("given up"),)
    assert run_shadow(p.SourceEnded(), state=state) == (p.ShadowState(D.GONE), [p.Destroy()])
    assert run_shadow(p.AbortAsked(), state=state) == (p.ShadowState(D.GONE), [p.Destroy()])


# ---- capabilities ---------------------------------------------------------------------------------------
def test_capabilities_intersection():
    own = StreamCapabilities(multifd_channels=3, compression=(Compression.ZSTD, Compression.NONE))
    offer = StreamCapabilities(multifd_channels=8, compression=(Compression.ZSTD, Compression.NONE))
    assert own.accept(offer) == StreamSettings(multifd_channels=3, compression=Compression.ZSTD)
    plain = StreamCapabilities(multifd_channels=2, compression=(Compression.NONE,))
    assert own.accept(plain) == StreamSettings(multifd_channels=2, compression=Compression.NONE)
    only_none = StreamCapabilities(multifd_channels=0, compression=(Compression.NONE,))
    assert only_none.accept(offer) == StreamSettings(multifd_channels=0, compression=Compression.NONE)
    assert own.accept(offer).within(offer) and own.accept(plain).within(plain)
    assert not StreamSettings(multifd_channels=3, compression=Compression.ZSTD).within(plain)


# ---- the property: never two running copies ----------------------------------------------------------
class Net:
    """Both machines and a network that loses requests or answers, or delivers a commit late."""

    def __init__(self, draw) -> None:  # type: ignore[no-untyped-def]
        self.draw = draw
        self.src = p.source_start().state
        self.dst = p.ShadowState()
        self.late: list[p.ShadowEvent] = []  # commits delivered at some later time

    def to_dst(self, event: p.ShadowEvent) -> list:
        step = p.shadow_step(self.dst, event)
        self.dst = step.state
        out = list(step.commands)
        if any(isinstance(c, p.WaitLoaded) for c in step.commands):
            loaded = self.draw(hs.sampled_from([p.StreamLoaded(), p.StreamNotLoaded("incoming failed")]))
            if self.draw(hs.booleans()):  # an abort may overtake the loading
                out += self.to_dst(p.AbortAsked())
            out += self.to_dst(loaded)
        return out

    def execute(self, command: p.SourceCommand) -> p.SourceEvent | None:
        fate = self.draw(hs.sampled_from(["lost", "answer lost", "answered", "late"]))
        if isinstance(command, (p.Commit, p.AskCommitted)):
            if fate == "lost":
                return p.CommitFailed("never connected", delivered=False)
            if fate == "late":
                self.late.append(p.CommitAsked())
                return p.CommitFailed("timeout", delivered=True)
            answers = self.to_dst(p.CommitAsked())
            if fate == "answer lost":
                return p.CommitFailed("timeout", delivered=True)
            return p.CommitAnswered() if p.AnswerCommitted() in answers else p.CommitFailed("refused", delivered=True)
        if isinstance(command, p.DestroyShadow):
            if fate in ("lost", "late"):
                return p.DestroyUnanswered("no answer")
            answers = self.to_dst(p.AbortAsked())
            if fate == "answer lost":
                return p.DestroyUnanswered("no answer")
            return p.ShadowCommitted() if any(isinstance(a, p.Refuse) and a.committed for a in answers) else p.ShadowDestroyed()
        return None

    def feed(self, event: p.SourceEvent) -> None:
        pending: p.SourceEvent | None = event
        while pending is not None:
            step = p.source_step(self.src, pending)
            self.src = step.state
            pending = None
            for command in step.commands:
                pending = self.execute(command) or pending
            self.check()

    def check(self) -> None:
        assert not (self.src.runs_here and self.dst.phase is D.RUNNING), (self.src, self.dst)
        if self.src.ran_there:
            assert self.dst.phase is D.RUNNING, (self.src, self.dst)


@settings(max_examples=1500, deadline=None, database=None)
@given(hs.data())
def test_no_event_sequence_runs_the_vm_on_both_hosts(data):
    net = Net(data.draw)
    if data.draw(hs.booleans()):
        net.to_dst(p.ShadowReady())
        net.feed(p.ShadowPrepared())
    for _ in range(data.draw(hs.integers(0, 12))):
        choice = data.draw(hs.sampled_from(["forward", "fail", "cancel", "shutdown", "resolve", "late",
                                            "guard", "dst restart", "stale ends"]))
        if choice == "forward":
            phase = net.src.phase
            net.feed(p.SwitchoverBegan() if phase is S.PRECOPY and data.draw(hs.booleans()) else p.StreamCompleted())
        elif choice == "fail":
            net.feed(p.Failed("broke"))
        elif choice == "cancel":
            net.feed(p.CancelAsked("user"))
        elif choice == "shutdown":
            net.feed(p.Shutdown())
        elif choice == "resolve" and net.src.phase is S.HELD:
            answer = net.execute(p.DestroyShadow())
            if answer is not None:
                net.feed(answer)
        elif choice == "late" and net.late:
            net.to_dst(net.late.pop())
        elif choice == "guard":
            net.to_dst(p.SourceGaveUp("silent"))
        elif choice == "dst restart":
            net.to_dst(p.AgentRestarted())
        elif choice == "stale ends":
            net.to_dst(p.SourceEnded())
        net.check()
    while net.late:  # every late commit arrives in the end
        net.to_dst(net.late.pop())
        net.check()
    # Settled either way: a finished source left exactly one running copy (a held one is the operator's).
    if net.src.phase in (S.DONE, S.ROLLED_BACK):
        assert net.src.runs_here != (net.dst.phase is D.RUNNING), (net.src, net.dst)
