//! The `ana:` section and `subsystems[].ana_groups`: how this node reports Asymmetric
//! Namespace Access, so that several nodes can serve one subsystem NQN as paths of one
//! multipath device (docs/configuration.md, "ANA and multipath").
//!
//! Kept beside `config.rs` as the first section of a `config/` folder: its structs, the
//! defaults that keep a single node as it was (one group, optimized, every namespace in it),
//! its checks and their tests. States are plain strings in the file and checked here, so a
//! wrong one gets a message naming its key and the states there are.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use stager_nvme::log_page::AnaState;

use super::{problem, Config, Problem, SubsystemConfig};
use crate::constants::{ANA_GROUP_ID_MAX, ANA_LOG_BYTES_MAX, CNTLID_MAX};

/// Node-wide ANA settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnaConfig {
    /// The controller ids this node hands out, `cntlid_min..=cntlid_max`. Nodes that serve the
    /// same subsystem NQN must use disjoint ranges: a host refuses a second controller whose
    /// id it already knows in that subsystem.
    pub cntlid_min: u16,
    pub cntlid_max: u16,
    /// ANATT: how long a group may stay in the `change` state before hosts give up on the
    /// path (Linux resets the controller after twice this).
    pub transition_time_s: u8,
}

impl Default for AnaConfig {
    fn default() -> Self {
        AnaConfig { cntlid_min: 1, cntlid_max: CNTLID_MAX, transition_time_s: 10 }
    }
}

/// One ANA group of a subsystem and its state on this node at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnaGroupConfig {
    /// 1..=ANA_GROUP_ID_MAX, unique in the subsystem; the same on every node that serves it.
    pub id: u32,
    /// `optimized`, `non-optimized`, `inaccessible`, `persistent-loss` or `change`, through
    /// every listener of the subsystem unless `listener_states` says otherwise.
    #[serde(default = "default_state")]
    pub state: String,
    /// NSIDs in this group. Namespaces no group lists belong to the first group.
    #[serde(default)]
    pub namespaces: Vec<u32>,
    /// A different state through some listeners (listener name → state): one node with two
    /// ports can then offer a preferred and a standby path.
    #[serde(default)]
    pub listener_states: BTreeMap<String, String>,
}

fn default_state() -> String {
    AnaState::Optimized.name().to_string()
}

impl AnaGroupConfig {
    /// The state through listener `name`. Call after validation; an unknown state (which
    /// validation refuses) reads as optimized rather than failing here.
    pub fn state_on(&self, listener: &str) -> AnaState {
        let s = self.listener_states.get(listener).unwrap_or(&self.state);
        AnaState::from_name(s).unwrap_or(AnaState::Optimized)
    }
}

impl SubsystemConfig {
    /// The subsystem's ANA groups as configured, or — when the file names none — one group 1,
    /// optimized, holding every namespace (a single node, as before ANA existed).
    pub fn effective_ana_groups(&self) -> Vec<AnaGroupConfig> {
        if !self.ana_groups.is_empty() {
            return self.ana_groups.clone();
        }
        vec![AnaGroupConfig { id: 1, state: default_state(), namespaces: Vec::new(), listener_states: BTreeMap::new() }]
    }

    /// The group id namespace `nsid` belongs to.
    pub fn ana_group_of(&self, nsid: u32) -> u32 {
        let groups = self.effective_ana_groups();
        groups.iter().find(|g| g.namespaces.contains(&nsid)).or(groups.first()).map_or(1, |g| g.id)
    }
}

fn check_state(key: String, s: &str) -> Result<(), Problem> {
    if AnaState::from_name(s).is_some() {
        return Ok(());
    }
    let names: Vec<&str> = AnaState::ALL.iter().map(|a| a.name()).collect();
    Err(problem(key, format!("`{s}` is not an ANA state ({})", names.join(", "))))
}

pub(super) fn check_ana(c: &Config) -> Result<(), Problem> {
    let a = &c.ana;
    if a.cntlid_min == 0 {
        return Err(problem("ana.cntlid_min", "controller id 0 is reserved; start at 1 or above"));
    }
    if a.cntlid_max > CNTLID_MAX {
        return Err(problem(
            "ana.cntlid_max",
            format!("{:#x} is reserved (controller ids end at {CNTLID_MAX:#x})", a.cntlid_max),
        ));
    }
    if a.cntlid_min > a.cntlid_max {
        return Err(problem("ana.cntlid_max", format!("{} is below ana.cntlid_min ({})", a.cntlid_max, a.cntlid_min)));
    }
    if a.transition_time_s == 0 {
        return Err(problem("ana.transition_time_s", "must be at least 1 second"));
    }
    // Nodes that serve a subsystem as paths (ana_groups written out) must let hosts read the
    // whole ANA log in one command: with a smaller MDTS Linux turns ANA off for the controller
    // and sends I/O to every path, inaccessible ones included.
    let io = c.transport.max_io_bytes;
    if io < ANA_LOG_BYTES_MAX {
        if let Some(i) = c.subsystems.iter().position(|s| !s.ana_groups.is_empty()) {
            return Err(problem(
                "transport.max_io_bytes",
                format!(
                    "{io} is below the {ANA_LOG_BYTES_MAX}-byte ANA log that hosts read in one command, and \
                     subsystems[{i}] has ana_groups (Linux would turn ANA off and use every path); use 16KiB or more"
                ),
            ));
        }
    }
    for (i, s) in c.subsystems.iter().enumerate() {
        // The listeners a subsystem is reachable on: its own list, or all of them.
        let reachable: Vec<&str> = if s.listeners.is_empty() {
            c.listeners.iter().map(|l| l.name.as_str()).collect()
        } else {
            s.listeners.iter().map(String::as_str).collect()
        };
        let mut ids: HashMap<u32, usize> = HashMap::new();
        let mut grouped: HashMap<u32, usize> = HashMap::new();
        for (j, g) in s.ana_groups.iter().enumerate() {
            let at = format!("subsystems[{i}].ana_groups[{j}]");
            if !(1..=ANA_GROUP_ID_MAX).contains(&g.id) {
                return Err(problem(format!("{at}.id"), format!("{} is out of range 1..={ANA_GROUP_ID_MAX}", g.id)));
            }
            if let Some(first) = ids.insert(g.id, j) {
                return Err(problem(
                    format!("{at}.id"),
                    format!("group {} is also subsystems[{i}].ana_groups[{first}]", g.id),
                ));
            }
            check_state(format!("{at}.state"), &g.state)?;
            for (k, nsid) in g.namespaces.iter().enumerate() {
                let key = format!("{at}.namespaces[{k}]");
                if !s.namespaces.iter().any(|n| n.nsid == *nsid) {
                    return Err(problem(key, format!("subsystems[{i}] has no namespace {nsid}")));
                }
                if let Some(first) = grouped.insert(*nsid, j) {
                    let why = format!("namespace {nsid} is already in subsystems[{i}].ana_groups[{first}]");
                    return Err(problem(key, why));
                }
            }
            for (name, state) in &g.listener_states {
                let key = format!("{at}.listener_states.{name}");
                if !reachable.contains(&name.as_str()) {
                    let why = format!("`{name}` is not a listener of this subsystem ({})", reachable.join(", "));
                    return Err(problem(key, why));
                }
                check_state(key, state)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, super::super::ConfigError> {
        let c = super::super::parse_shape(text, "t.yaml")?;
        c.validate_for_cpus("t.yaml", &[0])?;
        Ok(c)
    }
    fn parse_ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
    fn err_of(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("no error for\n{text}"))
    }

    const TWO_PORTS: &str = "\
listeners:
  - { name: a, address: 127.0.0.1:4420 }
  - { name: b, address: 127.0.0.1:4421 }
subsystems:
  - nqn: nqn.2026-11.dev.stager:mp
    allow_any_host: true
    namespaces:
      - { nsid: 1, backend: { kind: memory, size: 1MiB } }
      - { nsid: 2, backend: { kind: memory, size: 1MiB } }
";

    #[test]
    fn defaults_keep_one_optimized_group_with_every_namespace() {
        let c = parse_ok(TWO_PORTS);
        assert_eq!(c.ana, AnaConfig::default());
        let s = &c.subsystems[0];
        let groups = s.effective_ana_groups();
        assert_eq!(groups.len(), 1);
        assert_eq!(
            (groups[0].id, groups[0].state_on("a"), groups[0].state_on("b")),
            (1, AnaState::Optimized, AnaState::Optimized)
        );
        assert_eq!((s.ana_group_of(1), s.ana_group_of(2)), (1, 1));
        // A small MDTS is only refused where ana_groups say the node is one of several paths.
        let small = "transport: { max_io_bytes: 8KiB, in_capsule_data_bytes: 4096 }\n";
        parse_ok(&format!("{TWO_PORTS}{small}"));
        parse_ok(&format!("{TWO_PORTS}    ana_groups: [{{ id: 1 }}]\ntransport: {{ max_io_bytes: 16KiB }}\n"));
    }

    #[test]
    fn groups_listener_states_and_cntlid_range() {
        let text = format!(
            "{TWO_PORTS}    ana_groups:
      - {{ id: 1, state: optimized, listener_states: {{ b: inaccessible }} }}
      - {{ id: 7, state: non-optimized, namespaces: [2] }}
ana: {{ cntlid_min: 100, cntlid_max: 199, transition_time_s: 3 }}
"
        );
        let c = parse_ok(&text);
        assert_eq!(c.ana, AnaConfig { cntlid_min: 100, cntlid_max: 199, transition_time_s: 3 });
        let s = &c.subsystems[0];
        let g = s.effective_ana_groups();
        assert_eq!((g[0].state_on("a"), g[0].state_on("b")), (AnaState::Optimized, AnaState::Inaccessible));
        assert_eq!(g[1].state_on("b"), AnaState::NonOptimized);
        assert_eq!((s.ana_group_of(1), s.ana_group_of(2)), (1, 7), "unlisted namespaces join the first group");
    }

    #[test]
    fn bad_ana_settings_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("    ana_groups: [{ id: 0 }]\n", "subsystems[0].ana_groups[0].id", "out of range"),
            ("    ana_groups: [{ id: 129 }]\n", "subsystems[0].ana_groups[0].id", "out of range"),
            ("    ana_groups: [{ id: 1 }, { id: 1 }]\n", "subsystems[0].ana_groups[1].id", "also"),
            ("    ana_groups: [{ id: 1, state: fast }]\n", "subsystems[0].ana_groups[0].state", "not an ANA state"),
            ("    ana_groups: [{ id: 1, namespaces: [9] }]\n", "ana_groups[0].namespaces[0]", "no namespace 9"),
            (
                "    ana_groups: [{ id: 1, namespaces: [1] }, { id: 2, namespaces: [1] }]\n",
                "ana_groups[1].namespaces[0]",
                "already in",
            ),
            ("    ana_groups: [{ id: 1, listener_states: { c: optimized } }]\n", "listener_states.c", "not a listener"),
            ("    ana_groups: [{ id: 1, listener_states: { a: down } }]\n", "listener_states.a", "not an ANA state"),
            ("ana: { cntlid_min: 0 }\n", "ana.cntlid_min", "reserved"),
            ("ana: { cntlid_max: 65520 }\n", "ana.cntlid_max", "reserved"),
            ("ana: { cntlid_min: 10, cntlid_max: 9 }\n", "ana.cntlid_max", "below"),
            ("ana: { transition_time_s: 0 }\n", "ana.transition_time_s", "at least"),
            (
                "    ana_groups: [{ id: 1 }]\ntransport: { max_io_bytes: 8KiB, in_capsule_data_bytes: 4096 }\n",
                "transport.max_io_bytes",
                "ANA log",
            ),
            ("ana: { cntlid: 3 }\n", "cntlid", "unknown field"),
        ];
        for (extra, key, why) in cases {
            let msg = err_of(&format!("{TWO_PORTS}{extra}"));
            assert!(msg.contains(key) && msg.contains(why), "{extra}: {msg}");
        }
    }
}
