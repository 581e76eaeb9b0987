//! This node's liveness: one etcd lease, kept alive from the client's runtime, and the local
//! deadline that decides what `lease_state()` says.
//!
//! The argument for conservative liveness (docs/architecture.md, "Cluster state in etcd", says it
//! for operators): etcd expires a lease TTL seconds after it last *received* a keep-alive for it,
//! never earlier (a new etcd leader only extends leases). A keep-alive request received at all was
//! received after we sent it. So if a request sent at `S` was answered with a TTL, etcd cannot
//! expire the lease before `S + TTL` on its clock. The local deadline is `S + TTL - margin` for the
//! latest such `S`; once it passes the node reports [`LeaseState::Lost`] — whether or not etcd can
//! be reached, since nothing needs to arrive for a deadline to pass — and has `margin` to stop
//! acting as an owner before any other node can be told the lease is gone. Only one keep-alive is
//! in flight at a time, so an answer always belongs to the request whose send time we hold.
//!
//! `Lost` because the deadline passed is not final: if a later keep-alive is answered with a
//! positive TTL, the lease never expired (etcd does not renew an expired lease), nothing keyed
//! on it was taken over, and the state is `Alive` again. `Lost` because etcd answered that the
//! lease does not exist is final for that lease: `register` starts a new one.

// Without the `etcd` feature only the types and their checks' tests use these.
#![cfg_attr(not(feature = "etcd"), allow(dead_code))]

use std::time::{Duration, Instant};

use crate::constants::{KEEPALIVE_PER_TTL, LEASE_MARGIN_DIVISOR};

/// What this node may assume about its lease right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// etcd cannot expire the lease for at least `valid_for` (less the margin already taken).
    Alive { valid_for: Duration },
    /// The node must act as if another node may already have taken over what it owned: the
    /// local deadline passed, etcd says the lease is gone, or the node never registered.
    Lost,
}

/// The local deadline of one lease. Pure: the keeper feeds it send times and TTLs, callers ask
/// it with `now`.
#[derive(Debug, Clone)]
pub(crate) struct LeaseClock {
    margin: Duration,
    deadline: Option<Instant>,
    /// etcd answered that the lease does not exist: final.
    gone: bool,
}

impl LeaseClock {
    /// A clock for a lease of `ttl` (the configured one; the margin is taken from it).
    pub(crate) fn new(ttl: Duration) -> LeaseClock {
        LeaseClock { margin: margin(ttl), deadline: None, gone: false }
    }

    /// A keep-alive (or the grant) sent at `sent_at` was answered with `granted_ttl`.
    pub(crate) fn renewed(&mut self, sent_at: Instant, granted_ttl: Duration) {
        if self.gone || granted_ttl.is_zero() {
            self.gone = true;
            return;
        }
        let until = sent_at + granted_ttl.saturating_sub(self.margin);
        // Answers arrive in send order, but never let an older one shorten the deadline.
        self.deadline = Some(self.deadline.map_or(until, |d| d.max(until)));
    }

    pub(crate) fn gone(&mut self) {
        self.gone = true;
    }

    #[cfg(test)]
    pub(crate) fn is_gone(&self) -> bool {
        self.gone
    }

    pub(crate) fn state(&self, now: Instant) -> LeaseState {
        match self.deadline {
            Some(d) if !self.gone && now < d => LeaseState::Alive { valid_for: d - now },
            _ => LeaseState::Lost,
        }
    }
}

/// Time kept back from every deadline.
pub(crate) fn margin(ttl: Duration) -> Duration {
    ttl / LEASE_MARGIN_DIVISOR
}

/// Time between keep-alive requests, and how long one may wait for its answer.
pub(crate) fn keepalive_interval(ttl: Duration) -> Duration {
    ttl / KEEPALIVE_PER_TTL
}

/// etcd counts TTLs in whole seconds; round up so the lease is never shorter than asked.
pub(crate) fn ttl_seconds(ttl: Duration) -> i64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(s).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_send_time_plus_ttl_less_margin() {
        let ttl = Duration::from_secs(4);
        let mut clock = LeaseClock::new(ttl);
        let t0 = Instant::now();
        assert_eq!(clock.state(t0), LeaseState::Lost, "no renewal yet");
        clock.renewed(t0, ttl);
        assert_eq!(clock.state(t0), LeaseState::Alive { valid_for: Duration::from_secs(3) });
        assert_eq!(clock.state(t0 + Duration::from_secs(3)), LeaseState::Lost);
        // A late answer to an old request does not move the deadline back.
        clock.renewed(t0 + Duration::from_secs(2), ttl);
        clock.renewed(t0 + Duration::from_secs(1), ttl);
        assert_eq!(clock.state(t0 + Duration::from_secs(4)), LeaseState::Alive { valid_for: Duration::from_secs(1) });
        // Lost by the deadline, then answered again: alive (the lease never expired).
        clock.renewed(t0 + Duration::from_secs(10), ttl);
        assert!(matches!(clock.state(t0 + Duration::from_secs(11)), LeaseState::Alive { .. }));
        // Gone is final.
        clock.renewed(t0 + Duration::from_secs(11), Duration::ZERO);
        clock.renewed(t0 + Duration::from_secs(12), ttl);
        assert_eq!(clock.state(t0 + Duration::from_secs(12)), LeaseState::Lost);
        assert!(clock.is_gone());
    }

    #[test]
    fn deadline_never_reaches_the_server_expiry() {
        // The server expires at (receive time >= send time) + granted TTL; the local deadline
        // is strictly earlier for every TTL we accept.
        for secs in 2..=300u64 {
            let ttl = Duration::from_secs(secs);
            let mut clock = LeaseClock::new(ttl);
            let sent = Instant::now();
            clock.renewed(sent, ttl);
            assert_eq!(clock.state(sent + ttl), LeaseState::Lost);
            assert_eq!(clock.state(sent + ttl - margin(ttl)), LeaseState::Lost);
            assert!(keepalive_interval(ttl) * 2 < ttl - margin(ttl));
        }
        assert_eq!(ttl_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(ttl_seconds(Duration::from_secs(5)), 5);
    }
}
