//! Failover: how long after a leader fault writes are accepted again.
//!
//! For each `FaultStart` of a leader fault ([`crate::history::fault::LEADER_FAULTS`]) at
//! `t0`, the sample is `t_ok - t0` for the earliest acknowledgement (`SubmitOk`, `CancelOk`
//! or `CompleteOk`) of an operation *invoked* at or after `t0` — an operation invoked before
//! the fault may have been committed by the old leader and proves nothing about the new one.
//! A fault never followed by such a write is unmeasured, and the property is then unknown:
//! the run ends with a recovery phase in which writes must succeed, so an unmeasured fault
//! means the cluster never came back (or the run was cut short).
//!
//! p50/p99 are nearest-rank percentiles. Bounds are judged only when the expectations set
//! them, so ordinary tests do not depend on the speed of the machine.

use super::facts::{Answer, Facts};
use super::{Expectations, FailoverStats, Findings, Property, PropertyResult, Verdict};
use crate::history::fault;

/// Nearest-rank percentile (`per_mille` = 500 for the median) of ascending `sorted`.
fn percentile(sorted: &[u64], per_mille: usize) -> Option<u64> {
    let rank = (per_mille * sorted.len()).div_ceil(1000).max(1);
    sorted.get(rank - 1).copied()
}

/// Failover samples and the property's verdict.
pub(crate) fn failover(f: &Facts<'_>, expect: &Expectations) -> (PropertyResult, FailoverStats) {
    // Acknowledged writes as (invoked, acknowledged), by invoke time, with the earliest
    // acknowledgement among all later invokes precomputed.
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let ok_time = |a: Answer| match a {
        Answer::Ok { t, .. } => Some(t),
        _ => None,
    };
    writes.extend(f.submits.iter().filter_map(|s| Some((s.t_invoke, ok_time(s.answer)?))));
    writes.extend(f.cancels.iter().filter_map(|c| Some((c.t_invoke, ok_time(c.answer)?))));
    writes.extend(f.completes.iter().filter_map(|c| Some((c.t_invoke, ok_time(c.answer)?))));
    writes.sort_unstable();
    let mut earliest_ok_from = vec![u64::MAX; writes.len() + 1];
    for i in (0..writes.len()).rev() {
        earliest_ok_from[i] = earliest_ok_from[i + 1].min(writes[i].1);
    }

    let mut stats = FailoverStats::default();
    for fa in f.faults.iter().filter(|fa| fault::is_leader_fault(fa.kind)) {
        stats.leader_faults += 1;
        let first = writes.partition_point(|&(invoked, _)| invoked < fa.t_start);
        match earliest_ok_from[first] {
            u64::MAX => stats.unmeasured += 1,
            t_ok => stats.samples_ms.push(t_ok - fa.t_start),
        }
    }
    stats.samples_ms.sort_unstable();
    stats.p50_ms = percentile(&stats.samples_ms, 500);
    stats.p99_ms = percentile(&stats.samples_ms, 990);
    stats.max_ms = stats.samples_ms.last().copied();

    let mut findings = Findings::default();
    let limits = expect.failover_limits;
    for (name, got, limit) in [
        ("p50", stats.p50_ms, limits.p50_ms),
        ("p99", stats.p99_ms, limits.p99_ms),
        ("max", stats.max_ms, limits.max_ms),
    ] {
        if let (Some(got), Some(limit)) = (got, limit) {
            if got > limit {
                findings.push(|| format!("failover {name} {got}ms exceeds the bound of {limit}ms"));
            }
        }
    }
    let otherwise = if stats.unmeasured > 0 {
        Verdict::Unknown(format!(
            "{} of {} leader fault(s) were never followed by an acknowledged write",
            stats.unmeasured, stats.leader_faults
        ))
    } else {
        Verdict::Valid
    };
    let mut notes = vec![format!("{} acknowledged write(s)", writes.len())];
    if stats.leader_faults == 0 {
        notes.push("no leader fault in this run: nothing to measure".into());
    }
    (findings.into_result(Property::Failover, otherwise, notes), stats)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Expectations, FailoverLimits, Property};
    use super::*;
    use crate::history::EventKind;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 500), None);
        assert_eq!(percentile(&[7], 990), Some(7));
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!((percentile(&v, 500), percentile(&v, 990)), (Some(50), Some(99)));
        assert_eq!((percentile(&[1, 2, 3], 500), percentile(&[1, 2, 3], 990)), (Some(2), Some(3)));
    }

    #[test]
    fn healthy_failover_is_measured_from_the_first_write_invoked_after_the_kill() {
        let (h, e) = healthy();
        let r = assert_valid(&h, &e, Property::Failover);
        let start = h
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::FaultStart { id: 1, .. }))
            .unwrap()
            .t_ms;
        // The report invoked right after the kill ended unknown; the retry after the new
        // leader was elected is the first acknowledged write.
        let ok = h
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::CompleteOk { duplicate: true, .. }))
            .unwrap()
            .t_ms;
        assert_eq!(r.failover.samples_ms, vec![ok - start]);
        assert!(r.failover.samples_ms[0] > 150);
        assert_eq!(r.failover.p99_ms, r.failover.max_ms);
    }

    #[test]
    fn writes_invoked_before_the_fault_do_not_count() {
        let mut h = H::new();
        let op = h.submit_invoke("a", 1, &[]);
        h.fault_start(1, fault::PAUSE_LEADER, "n1");
        h.skip(500);
        h.submit_ok_for(op, "a", 1); // invoked before the pause: proves nothing
        h.fault_end(1);
        let r = assert_unknown(
            &h,
            &Expectations::default(),
            Property::Failover,
            "1 of 1 leader fault(s)",
        );
        assert_eq!(r.failover.unmeasured, 1);
        h.skip(100);
        let op = h.submit_invoke("b", 1, &[]);
        h.submit_ok_for(op, "b", 2);
        let r = assert_valid(&h, &Expectations::default(), Property::Failover);
        assert_eq!(r.failover.samples_ms, vec![h.t - 2]);
    }

    #[test]
    fn follower_faults_are_not_measured() {
        let mut h = H::new();
        h.fault_start(1, fault::KILL_FOLLOWER, "n3");
        h.fault_end(1);
        let r = assert_valid(&h, &Expectations::default(), Property::Failover);
        assert_eq!(r.failover.leader_faults, 0);
    }

    #[test]
    fn bounds_are_judged_when_set() {
        let mut h = H::new();
        for (id, gap) in [(1u64, 100u64), (2, 300), (3, 900)] {
            h.fault_start(id, fault::KILL_LEADER, "n1");
            h.skip(gap - 2);
            let op = h.submit_invoke(&format!("k{id}"), 1, &[]);
            h.submit_ok_for(op, &format!("k{id}"), id);
            h.fault_end(id);
        }
        let mut e = Expectations::default();
        let r = assert_valid(&h, &e, Property::Failover);
        assert_eq!(r.failover.samples_ms, vec![100, 300, 900]);
        assert_eq!(
            (r.failover.p50_ms, r.failover.p99_ms, r.failover.max_ms),
            (Some(300), Some(900), Some(900))
        );
        e.failover_limits =
            FailoverLimits { p50_ms: Some(300), p99_ms: Some(600), max_ms: Some(1000) };
        assert_invalid(
            &h,
            &e,
            Property::Failover,
            1,
            "failover p99 900ms exceeds the bound of 600ms",
        );
    }
}
