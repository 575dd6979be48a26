"""Health policy: reports -> health -> host state, and recovery clearing only what health set."""

from __future__ import annotations

from kvmotion.center.cluster import Health
from kvmotion.center.health import Report, next_state, overall
from kvmotion.center.placement import Status

C, Q, E, M, N = (Status.CONNECTED, Status.QUARANTINE, Status.ENTERING_MAINTENANCE, Status.MAINTENANCE,
                 Status.NOT_RESPONDING)


def test_the_worst_report_counts_with_its_reasons() -> None:
    assert overall([]) == (Health.OK, ())
    reports = [Report("external", "psu", Health.SEVERE, "PSU 2 failed"), Report("cpu-contention", "cpu", Health.MODERATE),
               Report("link", "vm-net", Health.OK)]
    assert overall(reports) == (Health.SEVERE, ("external: psu severe (PSU 2 failed)",))
    assert overall(reports[1:]) == (Health.MODERATE, ("cpu-contention: cpu moderate",))


def test_moderate_quarantines_severe_evacuates_recovery_clears_only_its_own() -> None:
    t = next_state("host-b", C, False, Health.MODERATE)
    assert (t.state, t.by_health) == (Q, True)
    assert t.sentence.startswith("host-b reports a moderate health fault: quarantined")
    t = next_state("host-b", Q, True, Health.SEVERE)
    assert (t.state, t.by_health) == (E, True)
    assert t.sentence == "host-b reports a severe health fault: it enters maintenance (its VMs are evacuated)"
    assert next_state("host-b", M, True, Health.SEVERE).state is M  # already there
    back = next_state("host-b", M, True, Health.OK)
    assert (back.state, back.sentence) == (C, "host-b is healthy again: back from maintenance")
    assert next_state("host-b", E, True, Health.MODERATE).state is Q
    # The admin's maintenance and liveness's verdict stand, whatever health says.
    for state in (M, E):
        assert next_state("host-b", state, False, Health.OK).sentence == ""
        assert next_state("host-b", state, False, Health.MODERATE).state is state
    assert next_state("host-b", N, False, Health.SEVERE).state is N
    assert next_state("host-b", C, False, Health.OK).sentence == ""
