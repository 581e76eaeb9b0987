//! Asymmetric Namespace Access: which paths to a namespace a host should use.
//!
//! Several nodes serve the same subsystem NQN and the same namespaces (same NSIDs, NGUIDs and
//! UUIDs); each node is one or more ports of that subsystem, with controller ids from its own
//! range. A namespace belongs to an ANA group; each listener of each node reports a state for
//! the group: optimized, non-optimized, inaccessible, persistent loss, or change. A
//! multipathing host (Linux's native NVMe multipath) sends I/O through optimized paths, falls
//! back to non-optimized ones, and never uses the others.
//!
//! **Where the state lives.** `SubsystemAna` holds, per group, one atomic state per listener
//! of the target. The I/O path reads it with one relaxed load per command (`state`), so a
//! command on an inaccessible path fails with a path-related status (SCT 3, no DNR) that makes
//! the host retry it on another path. Writers (`set_state`, from the management socket or the
//! failover logic, never a reactor) are serialised by a mutex so the log page's change counts
//! move with the states.
//!
//! **How hosts learn of a change.** `TargetShared::set_ana_state` marks every controller whose
//! path changed as having an ANA change notice pending and bumps `TargetShared::ana_changes`.
//! Reactors look at that counter on their timer tick and let the admin queue of each such
//! controller answer one held Asynchronous Event Request (notice, ANA change, log page 0Ch) if
//! the host enabled the notice; the host then reads the ANA log page, which re-arms the
//! notice (Get Log Page with RAE clear), as the base specification prescribes.
//!
//! **Usable until.** A group the cluster makes optimized carries a deadline (the node's lease's
//! local deadline, `set_ana_state_until`): once it passes, the group reads as inaccessible on
//! the I/O path and in the log page, without a writer — however stuck the cluster thread is, a
//! node that may have been replaced stops taking I/O for the volume, as its SAN gate stops
//! writing.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use stager_nvme::log_page::{AnaGroupDescriptor, AnaLog, AnaState};

use crate::subsystem::{SubsystemKind, TargetShared};

/// One ANA group of a subsystem.
pub struct AnaGroup {
    pub id: u32,
    /// The group's namespaces, ascending (the order the log page lists them in).
    pub nsids: Vec<u32>,
    /// The state through each listener of the target, indexed like `TargetShared::listeners`.
    states: Box<[AtomicU8]>,
    /// Bumped whenever the group's state through any listener changes.
    change_count: AtomicU64,
    /// Until when an optimized or non-optimized state holds (`deadline_ns`); 0: for good.
    usable_until_ns: AtomicU64,
}

/// Nanoseconds since the first call (never 0): how ANA deadlines are kept in an atomic.
fn deadline_ns(at: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    (at.saturating_duration_since(origin).as_nanos() as u64).max(1)
}

/// The ANA groups of one subsystem on this node.
pub struct SubsystemAna {
    pub groups: Vec<AnaGroup>,
    /// ANATT reported in Identify Controller.
    pub transition_time_s: u8,
    /// The log page's CHGCNT: bumped with every change of any group.
    change_count: AtomicU64,
    /// Serialises writers; readers (the I/O path, log pages) never take it.
    writer: Mutex<()>,
}

impl SubsystemAna {
    /// `groups`: (id, NSIDs, initial state through each listener of the target).
    pub fn new(groups: Vec<(u32, Vec<u32>, Vec<AnaState>)>, transition_time_s: u8) -> SubsystemAna {
        let groups = groups
            .into_iter()
            .map(|(id, mut nsids, states)| {
                nsids.sort_unstable();
                AnaGroup {
                    id,
                    nsids,
                    states: states.into_iter().map(|s| AtomicU8::new(s as u8)).collect(),
                    change_count: AtomicU64::new(0),
                    usable_until_ns: AtomicU64::new(0),
                }
            })
            .collect();
        SubsystemAna { groups, transition_time_s, change_count: AtomicU64::new(0), writer: Mutex::new(()) }
    }

    /// No groups (the discovery subsystem).
    pub fn none() -> SubsystemAna {
        SubsystemAna::new(Vec::new(), 0)
    }

    pub fn group_index(&self, id: u32) -> Option<usize> {
        self.groups.iter().position(|g| g.id == id)
    }

    /// The state of group `index` through `listener`: one atomic load (the I/O path calls it
    /// for every command), and a clock read for a usable state with a deadline, which reads as
    /// inaccessible once the deadline passed. Out-of-range indices read as optimized.
    #[inline]
    pub fn state(&self, index: usize, listener: usize) -> AnaState {
        let Some(g) = self.groups.get(index) else { return AnaState::Optimized };
        let state = g
            .states
            .get(listener)
            .and_then(|s| AnaState::from_u8(s.load(Ordering::Relaxed)))
            .unwrap_or(AnaState::Optimized);
        if matches!(state, AnaState::Optimized | AnaState::NonOptimized) {
            let until = g.usable_until_ns.load(Ordering::Relaxed);
            if until != 0 && deadline_ns(Instant::now()) >= until {
                return AnaState::Inaccessible;
            }
        }
        state
    }

    /// The ANA log page as a controller on `listener` reports it: every group that holds a
    /// namespace (the specification lists the groups of attached namespaces).
    pub fn log_page(&self, listener: usize) -> AnaLog {
        let groups = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.nsids.is_empty())
            .map(|(i, g)| AnaGroupDescriptor {
                group: g.id,
                change_count: g.change_count.load(Ordering::Acquire),
                state: self.state(i, listener),
                nsids: g.nsids.clone(),
            })
            .collect();
        AnaLog { change_count: self.change_count.load(Ordering::Acquire), groups }
    }

    /// Sets group `index` to `state` through each of `listeners`, usable until `until` (for
    /// good: `None`); returns the listeners whose state changed (a state whose deadline had
    /// passed counts as changed when it is set again).
    fn set_state(&self, index: usize, listeners: &[usize], state: AnaState, until: Option<Instant>) -> Vec<usize> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(g) = self.groups.get(index) else { return Vec::new() };
        let before: Vec<AnaState> = listeners.iter().map(|&l| self.state(index, l)).collect();
        g.usable_until_ns.store(until.map_or(0, deadline_ns), Ordering::Release);
        for &l in listeners {
            if let Some(s) = g.states.get(l) {
                s.store(state as u8, Ordering::Release);
            }
        }
        let changed: Vec<usize> = listeners
            .iter()
            .zip(before)
            .filter(|(&l, was)| g.states.get(l).is_some() && *was != state)
            .map(|(&l, _)| l)
            .collect();
        if !changed.is_empty() {
            g.change_count.fetch_add(1, Ordering::AcqRel);
            self.change_count.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }
}

/// Where a state change applies: `None` is every subsystem that has the group, every
/// listener of the subsystem.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnaScope {
    pub subsystem: Option<String>,
    pub listener: Option<String>,
}

/// One group's state through one listener, as `stagerctl ana show` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnaPathStatus {
    pub subsystem: String,
    pub group: u32,
    pub listener: String,
    pub address: String,
    pub state: String,
    pub namespaces: Vec<u32>,
    /// The group's change count (its descriptor's CHGCNT).
    pub change_count: u64,
    /// Controllers connected through this listener to this subsystem right now.
    pub controllers: usize,
}

/// What a `set_ana_state` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnaChange {
    /// The (subsystem, group, listener) paths whose state changed, with their new state.
    pub changed: Vec<AnaPathStatus>,
    /// Controllers told through an ANA change notice (those that enabled it and hold an
    /// Asynchronous Event Request get it at the next reactor tick).
    pub controllers_notified: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnaError {
    #[error("no subsystem {0} on this node")]
    NoSubsystem(String),
    #[error("no listener named {0} on this node")]
    NoListener(String),
    #[error("no ANA group {group} in {where_}")]
    NoGroup { group: u32, where_: String },
}

impl TargetShared {
    /// Sets ANA group `group` to `state` within `scope` and raises the ANA change notice on
    /// every controller whose path changed. Thread-safe; never blocks a reactor. Setting a
    /// state a path already has changes nothing and notifies no one.
    pub fn set_ana_state(&self, group: u32, state: AnaState, scope: &AnaScope) -> Result<AnaChange, AnaError> {
        self.set_ana_state_until(group, state, scope, None)
    }

    /// [`TargetShared::set_ana_state`], the state usable only until `until` (see "Usable
    /// until" above); `None`: for good.
    pub fn set_ana_state_until(
        &self,
        group: u32,
        state: AnaState,
        scope: &AnaScope,
        until: Option<Instant>,
    ) -> Result<AnaChange, AnaError> {
        let listeners: Vec<usize> = match &scope.listener {
            None => (0..self.listeners.len()).collect(),
            Some(name) => match self.listeners.iter().position(|(n, _)| n == name) {
                Some(i) => vec![i],
                None => return Err(AnaError::NoListener(name.clone())),
            },
        };
        let mut subsystems: Vec<_> = match &scope.subsystem {
            Some(nqn) => match self.subsystems.get(nqn) {
                Some(s) if s.kind == SubsystemKind::Nvm => vec![s.clone()],
                _ => return Err(AnaError::NoSubsystem(nqn.clone())),
            },
            None => self.subsystems.values().filter(|s| s.kind == SubsystemKind::Nvm).cloned().collect(),
        };
        subsystems.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        let mut out = AnaChange::default();
        let mut found = false;
        for sub in subsystems {
            let Some(index) = sub.ana.group_index(group) else { continue };
            found = true;
            // Only the listeners the subsystem is reachable on (all of them when unlisted).
            let reachable: Vec<usize> = listeners
                .iter()
                .copied()
                .filter(|&l| sub.listeners.is_empty() || sub.listeners.contains(&self.listeners[l].1))
                .collect();
            let changed = sub.ana.set_state(index, &reachable, state, until);
            for &l in &changed {
                let ctrls: Vec<_> = sub.controllers().into_iter().filter(|c| c.listener == l).collect();
                for c in &ctrls {
                    c.ana_change_pending.store(true, Ordering::Release);
                }
                out.controllers_notified += ctrls.len();
                out.changed.push(self.path_status(&sub, index, l));
            }
        }
        if !found {
            let where_ = scope.subsystem.clone().unwrap_or_else(|| "any subsystem of this node".into());
            return Err(AnaError::NoGroup { group, where_ });
        }
        if !out.changed.is_empty() {
            self.ana_changes.fetch_add(1, Ordering::AcqRel);
        }
        Ok(out)
    }

    /// Every (subsystem, group, listener) path of this node and its state.
    pub fn ana_status(&self) -> Vec<AnaPathStatus> {
        let mut subs: Vec<_> = self.subsystems.values().filter(|s| s.kind == SubsystemKind::Nvm).collect();
        subs.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        let mut out = Vec::new();
        for sub in subs {
            for index in 0..sub.ana.groups.len() {
                for (l, (_, addr)) in self.listeners.iter().enumerate() {
                    if sub.listeners.is_empty() || sub.listeners.contains(addr) {
                        out.push(self.path_status(sub, index, l));
                    }
                }
            }
        }
        out
    }

    fn path_status(&self, sub: &crate::subsystem::Subsystem, index: usize, listener: usize) -> AnaPathStatus {
        let g = &sub.ana.groups[index];
        let (name, addr) = &self.listeners[listener];
        AnaPathStatus {
            subsystem: sub.nqn.clone(),
            group: g.id,
            listener: name.clone(),
            address: addr.to_string(),
            state: sub.ana.state(index, listener).name().to_string(),
            namespaces: g.nsids.clone(),
            change_count: g.change_count.load(Ordering::Acquire),
            controllers: sub.controllers().iter().filter(|c| c.listener == listener).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_per_listener_and_change_counts() {
        let ana = SubsystemAna::new(
            vec![
                (1, vec![3, 1], vec![AnaState::Optimized, AnaState::Inaccessible]),
                (2, vec![], vec![AnaState::Optimized, AnaState::Optimized]),
            ],
            10,
        );
        assert_eq!((ana.state(0, 0), ana.state(0, 1)), (AnaState::Optimized, AnaState::Inaccessible));
        assert_eq!(ana.state(9, 0), AnaState::Optimized, "out of range reads as optimized");
        let log = ana.log_page(1);
        assert_eq!(log.groups.len(), 1, "a group without namespaces is not listed");
        assert_eq!((log.groups[0].nsids.clone(), log.groups[0].state), (vec![1, 3], AnaState::Inaccessible));
        assert_eq!(log.change_count, 0);
        // Setting the state a path has changes nothing.
        assert!(ana.set_state(0, &[0], AnaState::Optimized, None).is_empty());
        assert_eq!(ana.set_state(0, &[0, 1], AnaState::NonOptimized, None), vec![0, 1]);
        let log = ana.log_page(0);
        assert_eq!((log.change_count, log.groups[0].change_count, log.groups[0].state), (1, 1, AnaState::NonOptimized));
    }

    #[test]
    fn a_usable_state_with_a_deadline_reads_inaccessible_once_it_passed() {
        let ana = SubsystemAna::new(vec![(1, vec![1], vec![AnaState::Inaccessible])], 10);
        let soon = Instant::now() + std::time::Duration::from_millis(60);
        assert_eq!(ana.set_state(0, &[0], AnaState::Optimized, Some(soon)), vec![0]);
        assert_eq!(ana.state(0, 0), AnaState::Optimized);
        std::thread::sleep(std::time::Duration::from_millis(80));
        assert_eq!(ana.state(0, 0), AnaState::Inaccessible, "past its deadline");
        assert_eq!(ana.log_page(0).groups[0].state, AnaState::Inaccessible, "the log page says so too");
        // Opened again (a new deadline): a change hosts are told of.
        let later = Instant::now() + std::time::Duration::from_secs(60);
        assert_eq!(ana.set_state(0, &[0], AnaState::Optimized, Some(later)), vec![0]);
        assert_eq!(ana.state(0, 0), AnaState::Optimized);
        // Extending a deadline that has not passed changes nothing for hosts.
        assert!(ana.set_state(0, &[0], AnaState::Optimized, None).is_empty());
        // Inaccessible has no deadline to pass.
        assert_eq!(ana.set_state(0, &[0], AnaState::Inaccessible, Some(soon)), vec![0]);
        assert_eq!(ana.state(0, 0), AnaState::Inaccessible);
    }
}
