//! The crate's one error type. Each variant says what failed in words an operator can act on:
//! which endpoints could not be reached, which call timed out, which key holds a bad record.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A `ClusterConfig` (or a `NodeInfo`) that cannot work; says which field and why.
    #[error("cluster config: {0}")]
    Config(String),
    /// No etcd endpoint answered (connection refused, reset, no route).
    #[error("etcd unreachable at {endpoints} while {what}: {detail}")]
    Unreachable { endpoints: String, what: String, detail: String },
    /// etcd did not answer within the call's time limit.
    #[error("etcd at {endpoints} did not answer {what} within {} ms", .after.as_millis())]
    Timeout { endpoints: String, what: String, after: Duration },
    /// etcd answered with an error (other than being unavailable).
    #[error("etcd refused {what}: {detail}")]
    Etcd { what: String, detail: String },
    /// A value under our prefix that is not a record of the kind its key says (bad JSON, wrong
    /// shape, an id that does not match its key, a broken invariant, too large). Records are
    /// input: the key names what to fix.
    #[error("malformed record at {key}: {detail}")]
    Malformed { key: String, detail: String },
    /// A record this client was asked to write breaks a record invariant (it would be refused
    /// when read back).
    #[error("refusing to write an invalid record for {key}: {detail}")]
    InvalidRecord { key: String, detail: String },
    /// The call needs this node registered (`register`) first.
    #[error("node {node} is not registered (call register first)")]
    NotRegistered { node: String },
    /// This node's lease is lost (its local deadline passed, or etcd says it is gone): the node
    /// must not act as an owner or as the manager until it registers again.
    #[error("node {node}'s lease is lost")]
    LeaseLost { node: String },
    /// A leader-only write by a node that does not hold the manager key (never won, resigned, or
    /// deposed: its key was deleted or its lease expired).
    #[error("node {node} is not the resource manager")]
    NotLeader { node: String },
    /// `stop()` was called (or the client's runtime is gone).
    #[error("the cluster client is stopped")]
    Stopped,
}
